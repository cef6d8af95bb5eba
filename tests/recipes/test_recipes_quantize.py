"""The quantize recipe through the real CLI: a tiny QAT run (learned ranges) converted to 8da4w, a tiny float
HF checkpoint converted to GGUF Q4_0, and the one-line refusals."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qattune.checkpoint import GGUFCheckpointer, HFCheckpointer, build_model_from_checkpoint, write_hf_checkpoint
from qattune.models import get_adapter, llama
from qattune.models.adapters import half_split_to_interleaved
from qattune.checkpoint.auto import load_model
from qattune.models.transformer import Transformer
from qattune.quant import PTQQuantizer, QATQuantizer, QuantizedLinear, read_quantization_config

TRAIN = ["max_steps_per_epoch=4", "batch_size=4", "dataset.max_seq_len=64", "dataset_val.max_seq_len=64",
         "run_val_every_n_steps=null", "progress_bar=false", "fake_quant_after_n_steps=0",
         "+quantizer.range_learning=true"]
TOKENS = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 257, 3]])


def run_cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "qattune.cli.main", "run", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def without_kernels(model):
    """`model` with its quantized Linear layers on the dequantize path (exactly the fake-quant numerics)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernels = False
    return model


def quantized_model(directory: Path) -> Transformer:
    """The saved quantized model, loaded as eval/generate would, on the dequantize path (no kernels)."""
    return without_kernels(load_model(directory))


@pytest.fixture(scope="module")
def qat_quantized(tmp_path_factory):
    """tiny/qat_full for 4 steps with learned ranges, then `quantize --config tiny/quantize`."""
    out = tmp_path_factory.mktemp("quantize") / "qat"
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *TRAIN)
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={out}", f"checkpoint_dir={out / 'step_4'}")
    return out, proc.stdout


def test_converted_model_computes_what_the_fake_quantized_model_trained(qat_quantized):
    out, _ = qat_quantized
    step = out / "step_4"
    fake = build_model_from_checkpoint(HFCheckpointer(str(step)))
    QATQuantizer("8da4w", group_size=32, range_learning=True).prepare(fake)
    fake.load_state_dict(load_file(str(step / "extra_state.safetensors")), strict=False)
    converted = quantized_model(out / "quantized")
    with torch.no_grad():
        expected, got = fake.eval()(TOKENS), converted(TOKENS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert read_quantization_config(out / "quantized")["quantization"]["scheme"] == "8da4w"


def test_learned_scales_are_the_ones_used(qat_quantized):
    """q_proj's int4 weights: round(w / s) clamped to [-8, 7] with the learned (not the dynamic) scale s."""
    out, _ = qat_quantized
    learned = load_file(str(out / "step_4" / "extra_state.safetensors"))["layers.0.attn.q_proj.weight_range_learner.scale"]
    float_w = load_file(str(out / "step_4" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    groups = float_w.reshape(64, 2, 32)
    dynamic = groups.abs().amax(-1) / 7.5
    assert not torch.allclose(learned, dynamic, rtol=1e-3)  # training moved the ranges
    expected = (torch.clamp(torch.round(groups / learned.unsqueeze(-1)), -8, 7) * learned.unsqueeze(-1)).reshape(64, 64)
    got = quantized_model(out / "quantized").layers[0].attn.q_proj.dequantized_weight()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_sizes_printed_are_the_files(qat_quantized):
    out, stdout = qat_quantized
    before = re.search(r"Size before: ([\d.]+) MB checkpoint on disk", stdout)
    after = re.search(r"Size after: +([\d.]+) MB on disk .*checkpoint ([\d.]+)x", stdout)
    assert before and after, stdout
    source = (out / "step_4" / "model.safetensors").stat().st_size
    quantized = (out / "quantized" / "model.safetensors").stat().st_size
    assert float(before.group(1)) == pytest.approx(source / 1e6, abs=0.006)
    assert float(after.group(1)) == pytest.approx(quantized / 1e6, abs=0.006)
    assert float(after.group(2)) == pytest.approx(source / quantized, abs=0.006)
    assert "layers.0-1.mlp.down_proj" in stdout and "int4_sym" in stdout  # the per-layer report
    hf_config = json.loads((out / "quantized" / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == 2
    assert hf_config["quantization_config"] == {  # transformers refuses a null quant_method
        "quant_method": None, "format": "qattune.quantized/2", "scheme": "8da4w", "group_size": 32,
        "load_with": "qattune (qattune run generate|eval checkpoint_dir=<this folder>): packed tensors described "
                     "in quantization_config.json, which transformers cannot load"}
    assert not (out / "quantized" / "model-8da4w.gguf").exists()


TRAINED = "was trained with scheme '8da4w' with group size 32"


@pytest.mark.parametrize("override, message", [
    (["quantizer.scheme=4w", "quantizer.group_size=128"],
     f"{TRAINED}, quantize_activations=true (qattune_training.json); quantize with the same options: "
     "quantizer.scheme=8da4w quantizer.group_size=32"),
    (["quantizer.group_size=64"],
     f"{TRAINED} (qattune_training.json); quantize with the same options: quantizer.group_size=32"),
    (["+quantizer.quantize_embedding=true"],
     f"{TRAINED}, quantize_embedding=false (qattune_training.json); quantize with the same options: "
     "quantizer.quantize_embedding=false"),
    (["+quantizer.quantize_output=false"],
     f"{TRAINED}, quantize_output=true (qattune_training.json); quantize with the same options: "
     "quantizer.quantize_output=true"),
    (["+quantizer.exclude=[output]"],
     f"{TRAINED}, exclude=[] (qattune_training.json); quantize with the same options: quantizer.exclude=[]"),
    (["quantizer={_component_: torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer, groupsize: 256}"],
     f"{TRAINED} (qattune_training.json); quantize with the same options: quantizer.groupsize=32"),
    (["quantizer={_component_: torchtune.training.quantization.Int4WeightOnlyQATQuantizer, groupsize: 32}"],
     f"{TRAINED}, quantize_activations=true (qattune_training.json); "
     "torchtune.training.quantization.Int4WeightOnlyQATQuantizer always quantizes with another scheme: use "
     "quantizer='{_component_: qattune.quant.QATQuantizer, scheme: 8da4w}'"),
])
def test_options_other_than_the_trained_ones_are_refused(qat_quantized, tmp_path, override, message):
    out, _ = qat_quantized
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}", f"checkpoint_dir={out / 'step_4'}",
                   *override, ok=False)
    assert one_error_line(proc) == f"error: {out / 'step_4'} {message}{ANYWAY}"
    assert not (tmp_path / "quantized").exists()


ANYWAY = "; or match_training=false to quantize it with these options anyway (PTQ of its weights: QAT learnt its own scheme's roundings)"


def test_match_training_false_quantizes_a_qat_checkpoint_to_another_scheme(qat_quantized, tmp_path):
    """PTQ of the QAT run's weights to q8_0, on purpose: a warning, not an error."""
    out, _ = qat_quantized
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}", f"checkpoint_dir={out / 'step_4'}",
                   "quantizer.scheme=q8_0", "~quantizer.group_size", "match_training=false", "gguf=false")
    assert f"warning: {out / 'step_4'} was trained with other quantizer options (scheme, group_size" in proc.stdout
    config = json.loads((tmp_path / "quantized" / "quantization_config.json").read_text())
    assert config["quantization"]["scheme"] == "q8_0"


def test_the_suggested_torchtune_override_quantizes(qat_quantized, tmp_path):
    out, _ = qat_quantized
    run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}", f"checkpoint_dir={out / 'step_4'}",
            "quantizer={_component_: torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer, groupsize: 256}",
            "quantizer.groupsize=32")
    with torch.no_grad():
        assert torch.equal(quantized_model(tmp_path / "quantized")(TOKENS), quantized_model(out / "quantized")(TOKENS))


def test_ranges_a_run_never_learned_start_from_the_weights_as_in_ptq(tmp_path):
    """Range learning with fake quantization never on (a float run) leaves no learned ranges: quantize
    says so and quantizes like PTQ instead of failing."""
    out = tmp_path / "float_phase_only"
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *TRAIN[:-2],
            "fake_quant_after_n_steps=4", "+quantizer.range_learning=true")
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={out}", f"checkpoint_dir={out / 'step_4'}")
    assert (f"warning: {out / 'step_4'} trained with range learning, but fake quantization never turned on in that "
            "run (fake_quant_after_n_steps at or past its last step): 15 layers' ranges were never learned, so they "
            "come from the weights, as in PTQ") in proc.stdout
    run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path / 'ptq'}", f"checkpoint_dir={out / 'step_4'}",
            "quantizer._component_=qattune.quant.PTQQuantizer")
    ptq = quantized_model(tmp_path / "ptq" / "quantized").layers[0].attn.q_proj.dequantized_weight()
    ours = quantized_model(out / "quantized").layers[0].attn.q_proj.dequantized_weight()
    assert torch.equal(ours, ptq)


def test_quantized_checkpoint_as_input_is_refused(qat_quantized, tmp_path):
    out, _ = qat_quantized
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}",
                   f"checkpoint_dir={out / 'quantized'}", ok=False)
    assert "is already a quantized checkpoint" in one_error_line(proc)


def test_a_gguf_file_for_the_folder_checkpointer_names_the_gguf_one(tmp_path):
    write_tokenizer_gguf(tmp_path / "model.gguf")
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}",
                   f"checkpoint_dir={tmp_path / 'model.gguf'}", ok=False)
    assert one_error_line(proc) == (f"error: checkpointer.checkpoint_dir={tmp_path / 'model.gguf'} is a GGUF file: "
                                    "read it with checkpointer=qattune.checkpoint.GGUFCheckpointer")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}", "device=cuda", ok=False)
    assert one_error_line(proc) == "error: device 'cuda' was requested but no CUDA GPU is visible; set device=cpu"


def test_gguf_for_a_scheme_gguf_cannot_hold_is_refused(tmp_path):
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}", "gguf=true", ok=False)
    line = one_error_line(proc)
    assert "scheme '8da4w' cannot be stored in a GGUF file" in line and "gguf=false" in line


# --- GGUF Q4_0 from a float HF checkpoint ------------------------------------------------------------------

def write_tokenizer_gguf(path: Path) -> None:
    """A 260-token byte-level BPE tokenizer as GGUF metadata: 256 bytes, 2 merges, 2 control tokens."""
    from qattune.tokenizers.byte_level import byte_to_char

    table = byte_to_char()
    tokens = [table[b] for b in range(256)] + ["he", "hel", "<|endoftext|>", "<|pad|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 258 + [3, 3])
    writer.add_token_merges(["h e", "he l"])
    writer.add_eos_token_id(258)
    writer.add_pad_token_id(259)
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def q4_0_reference(w: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_0 quantize-dequantize (NUMERICS.md): d = signed absmax / -8, q = min(15, trunc(x/d + 8.5))."""
    blocks = w.float().reshape(-1, 32)
    index = blocks.abs().argmax(-1, keepdim=True)
    d = blocks.gather(-1, index) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.clamp(torch.trunc(blocks * inv + 8.5), max=15)
    return ((q - 8) * d.half().float()).reshape(w.shape)


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    """A tiny float Llama (seeded random weights) saved as a Hugging Face folder."""
    torch.manual_seed(0)
    model = llama(260, 2, 4, 2, 64, 192, 256)
    source = tmp_path_factory.mktemp("float")
    write_hf_checkpoint(model.state_dict(), model.config, get_adapter("llama"), source, 1 << 30)
    return model, source


def test_q4_0_gguf_reads_back_with_the_same_weights_and_logits(tmp_path, float_checkpoint):
    model, source = float_checkpoint
    tokenizer_file = tmp_path / "tokenizer.gguf"
    write_tokenizer_gguf(tokenizer_file)
    out = tmp_path / "out"
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={out}", f"checkpoint_dir={source}",
                   "quantizer._component_=qattune.quant.PTQQuantizer", "quantizer.scheme=q4_0", "~quantizer.group_size",
                   "tokenizer._component_=qattune.tokenizers.gguf_tokenizer", f"+tokenizer.path={tokenizer_file}")
    path = out / "quantized" / "model-q4_0.gguf"
    assert re.search(r"GGUF: +[\d.]+ MB on disk", proc.stdout)

    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["token_embd.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    source_tokens = gguf.GGUFReader(str(tokenizer_file)).fields["tokenizer.ggml.tokens"].contents()
    assert reader.fields["tokenizer.ggml.tokens"].contents() == source_tokens
    assert reader.fields["tokenizer.ggml.merges"].contents() == ["h e", "he l"]

    def read(name: str) -> torch.Tensor:
        t = next(t for t in reader.tensors if t.name == name)
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))

    float_sd = model.state_dict()
    torch.testing.assert_close(read("blk.1.ffn_down.weight"), q4_0_reference(float_sd["layers.1.mlp.down_proj.weight"]),
                               rtol=0, atol=0)
    q_rows = half_split_to_interleaved(float_sd["layers.0.attn.q_proj.weight"], 4)  # llama.cpp's rotary layout
    torch.testing.assert_close(read("blk.0.attn_q.weight"), q4_0_reference(q_rows), rtol=0, atol=0)

    reimported = build_model_from_checkpoint(GGUFCheckpointer(str(path))).eval()
    converted = quantized_model(out / "quantized")
    with torch.no_grad():
        torch.testing.assert_close(reimported(TOKENS), converted(TOKENS), rtol=1e-5, atol=1e-5)
    # the saved quantized model is PTQ of the float one: same as converting it here
    model = without_kernels(PTQQuantizer("q4_0").convert(copy.deepcopy(model)))
    with torch.no_grad():
        torch.testing.assert_close(converted(TOKENS), model.eval()(TOKENS), rtol=0, atol=0)


def test_a_tied_head_is_stored_once(tmp_path):
    """q8_0 quantizes the embedding and the tied head alike: model.safetensors holds them once, and the
    loaded model's head reads the embedding's very tensors."""
    torch.manual_seed(0)
    model = llama(260, 2, 4, 2, 64, 192, 256, tie_embeddings=True)
    source = tmp_path / "tied"
    source.mkdir()
    write_hf_checkpoint(model.state_dict(), model.config, get_adapter("llama"), source, 1 << 30)
    run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}", f"checkpoint_dir={source}",
            "quantizer._component_=qattune.quant.PTQQuantizer", "quantizer.scheme=q8_0", "~quantizer.group_size",
            "gguf=false")
    out = tmp_path / "quantized"
    assert read_quantization_config(out)["tied_tensors"] == {"output.weight_packed": "tok_embeddings.weight_packed",
                                                              "output.weight_scale": "tok_embeddings.weight_scale"}
    assert not any(key.startswith("output.") for key in load_file(str(out / "model.safetensors")))
    loaded = quantized_model(out)
    assert loaded.output.weight_packed.data_ptr() == loaded.tok_embeddings.weight_packed.data_ptr()
    PTQQuantizer("q8_0").convert(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), without_kernels(model).eval()(TOKENS), rtol=0, atol=0)


def test_gguf_with_a_tokenizer_gguf_cannot_hold_is_refused_before_loading(tmp_path, float_checkpoint):
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}", "quantizer.scheme=q4_0",
                   "~quantizer.group_size", f"checkpoint_dir={float_checkpoint[1]}", ok=False)
    assert "ByteTokenizer has no GGUF tokenizer form" in one_error_line(proc)
    assert not (tmp_path / "quantized").exists()


# --- PTQ with GPTQ rounding --------------------------------------------------------------------------------

GPTQ_PTQ = ["+quantizer.range_learning=true", "+quantizer.range_init=cover", "+quantizer.rounding_init=gptq",
            "+quantizer.gptq_batches=4", "batch_size=2"]
CALIBRATION = "+dataset={_component_: qattune.data.python_docs_dataset, split: train, max_seq_len: 64}"


def test_gptq_ptq_keeps_the_cover_scales_and_lowers_the_output_error(tmp_path, float_checkpoint):
    from qattune.data import python_docs_dataset
    from qattune.quant.formats import IntAffine
    from qattune.tokenizers import byte_tokenizer

    model, source = float_checkpoint
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}", f"checkpoint_dir={source}",
                   *GPTQ_PTQ, CALIBRATION)
    assert "GPTQ rounding: 14 layers from 512 calibration tokens" in proc.stdout  # 4 batches of 2 x 64
    gptq = quantized_model(tmp_path / "quantized")
    scale, _ = IntAffine(4, True, 32).covering_qparams(model.layers[0].attn.q_proj.weight)
    codes = gptq.layers[0].attn.q_proj.dequantized_weight().reshape(64, 2, 32) / scale.reshape(64, 2, 1)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # on the cover grid
    assert codes.round().min() >= -8 and codes.round().max() <= 7
    nearest = copy.deepcopy(model)
    QATQuantizer("8da4w", group_size=32, range_learning=True, range_init="cover").prepare(nearest)
    with torch.no_grad():
        nearest(TOKENS)  # each learner starts from its weight's cover scales on its first forward
    QATQuantizer("8da4w", group_size=32, range_learning=True, range_init="cover").convert(nearest)
    assert not torch.equal(gptq.layers[0].attn.q_proj.dequantized_weight(), nearest.layers[0].attn.q_proj.dequantized_weight())
    data = python_docs_dataset(byte_tokenizer(), split="validation", max_seq_len=64)
    tokens = torch.stack([data[i]["tokens"] for i in range(8)])
    with torch.no_grad():
        reference = model.eval()(tokens)
        errors = [float((m.eval()(tokens) - reference).square().mean()) for m in (gptq, nearest)]
    assert errors[0] < errors[1]


def test_gptq_ptq_without_calibration_data_is_one_line(tmp_path, float_checkpoint):
    _, source = float_checkpoint
    proc = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={tmp_path}", f"checkpoint_dir={source}",
                   *GPTQ_PTQ, ok=False)
    assert "quantizer.rounding_init=gptq calibrates on text: set dataset" in one_error_line(proc)


def test_q4_0_qat_from_gptq_reaches_the_gguf_file_as_trained(tmp_path):
    """qat_distributed with q4_0, learned block scales and a GPTQ start, then quantize to GGUF: the file's
    Q4_0 tensors are the trained model's fake-quantized weights, with its learned (signed) scales."""
    out = tmp_path / "qat"
    trained = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *TRAIN,
                      "quantizer.scheme=q4_0", "~quantizer.group_size", "+quantizer.range_init=cover",
                      "+quantizer.rounding_init=gptq", "+quantizer.gptq_batches=2", "range_learning_lr=1e-5")
    assert "GPTQ rounding: 14 layers from 512 calibration tokens" in trained.stdout  # 2 batches of 4 x 64
    tokenizer_file = tmp_path / "tokenizer.gguf"
    write_tokenizer_gguf(tokenizer_file)
    run_cli("quantize", "--config", "tiny/quantize", f"output_dir={out}", f"checkpoint_dir={out / 'step_4'}",
            "quantizer.scheme=q4_0", "~quantizer.group_size",
            "tokenizer._component_=qattune.tokenizers.gguf_tokenizer", f"+tokenizer.path={tokenizer_file}")
    step = out / "step_4"
    fake = build_model_from_checkpoint(HFCheckpointer(str(step)))
    QATQuantizer("q4_0", range_learning=True).prepare(fake)
    ranges = load_file(str(step / "extra_state.safetensors"))
    fake.load_state_dict(ranges, strict=False)
    down = fake.layers[1].mlp.down_proj
    scale = ranges["layers.1.mlp.down_proj.weight_range_learner.scale"]
    assert bool((scale < 0).any() and (scale > 0).any())
    with torch.no_grad():
        expected = down.weight_range_learner(down.weight)
    reader = gguf.GGUFReader(str(out / "quantized" / "model-q4_0.gguf"))
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
    read_back = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    torch.testing.assert_close(read_back, expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(quantized_model(out / "quantized")(TOKENS), fake.eval()(TOKENS), rtol=1e-4, atol=1e-4)


def test_qat_from_awq_scaled_gptq_converts_to_the_model_it_trained(tmp_path):
    """AWQ scaling moves factors into the norm gains and weights before GPTQ; the checkpoint is a plain
    model carrying them, and `quantize` turns it into the fake-quantized model that was trained."""
    out = tmp_path / "qat"
    trained = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *TRAIN,
                      "+quantizer.range_init=cover", "+quantizer.rounding_init=gptq", "+quantizer.gptq_batches=2",
                      "+quantizer.awq_scaling=true", "range_learning_lr=1e-5")
    assert re.search(r"GPTQ rounding: 14 layers from 512 calibration tokens .*\(AWQ scaling alone: 0\.\d\dx\)",
                     trained.stdout)
    run_cli("quantize", "--config", "tiny/quantize", f"output_dir={out}", f"checkpoint_dir={out / 'step_4'}")
    step = out / "step_4"
    fake = build_model_from_checkpoint(HFCheckpointer(str(step)))
    QATQuantizer("8da4w", group_size=32, range_learning=True).prepare(fake)
    fake.load_state_dict(load_file(str(step / "extra_state.safetensors")), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(quantized_model(out / "quantized")(TOKENS), fake.eval()(TOKENS), rtol=1e-4, atol=1e-4)
