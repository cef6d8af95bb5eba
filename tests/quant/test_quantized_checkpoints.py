"""Saved quantized checkpoints as eval/generate load them: int4 on odd widths, tied tensors stored once,
transformers refusing the folder, the compute dtype, and one-line errors for broken folders."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from qattune.checkpoint import load_model
from qattune.checkpoint.auto import checkpoint_config
from qattune.errors import QattuneError
from qattune.models import get_adapter, llama
from qattune.quant import QATQuantizer, QuantizedLinear, save_quantized
from qattune.quant.modules import kernels
from qattune.quant.serialization import CONFIG_FILE, WEIGHTS_FILE

IDS = torch.tensor([[1, 7, 3, 99, 259, 0, 64, 5], [2, 2, 8, 9, 10, 11, 12, 13]])


def tiny(tie_embeddings=False, seed=0):
    """A 2-layer Llama with a 260-token vocabulary (not a multiple of 16, as tinygemm's CPU packing needs)."""
    torch.manual_seed(seed)
    return llama(260, 2, 4, 2, 64, 192, 256, tie_embeddings=tie_embeddings).eval()


def save(model, directory, tied_layers=None):
    hf = get_adapter("llama").config_to_hf(model.config, torch.float32)
    return save_quantized(model, directory, hf_config=hf, tied_layers=tied_layers)


def stored_keys(directory):
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
        return set(f.keys())


def test_4w_with_an_odd_output_width_reloads_and_computes_what_was_trained(tmp_path):
    model = tiny()
    quantizer = QATQuantizer("4w", group_size=32)
    quantizer.prepare(model)
    with torch.no_grad():
        fake = model(IDS)
    save(quantizer.convert(model), tmp_path)
    loaded = load_model(tmp_path)
    assert kernels.int4_pack_for_kernel(torch.zeros(260, 64, dtype=torch.uint8)) is None  # N % 16 != 0
    assert kernels.int4_pack_for_kernel(torch.zeros(256, 64, dtype=torch.uint8)) is not None
    with torch.no_grad():
        logits = loaded(IDS)
    torch.testing.assert_close(logits, fake, rtol=1e-4, atol=1e-4)
    head, q_proj = loaded.output, loaded.layers[0].attn.q_proj
    assert isinstance(head, QuantizedLinear) and head._kernel_weight is None  # fp32: the kernel is not tried
    with torch.no_grad():
        loaded.to(torch.bfloat16)(IDS)  # the CPU kernel's dtype
    refused = head._kernel_weight
    assert refused == (torch.device("cpu"), None)  # dequantize path for 260 rows, and remembered as such
    assert q_proj._kernel_weight[1] is not None  # the 64-row layers use the kernel
    with torch.no_grad():
        loaded(IDS)
    assert head._kernel_weight is refused  # not unpacked and tried again on every call


@pytest.fixture(scope="module")
def tied_q4_0(tmp_path_factory):
    """A tied-embedding model converted to q4_0 (embedding and head both Q8_0), saved with and without
    naming the tie."""
    model = QATQuantizer("q4_0").convert(tiny(tie_embeddings=True))
    root = tmp_path_factory.mktemp("tied")
    save(model, root / "tied", {"output": "tok_embeddings"})
    save(model, root / "untied")
    return model, root


def test_tied_head_is_stored_once_and_shares_the_embeddings_tensors(tied_q4_0):
    model, root = tied_q4_0
    head_keys = {"output.weight_packed", "output.weight_scale"}
    assert head_keys <= stored_keys(root / "untied")
    assert not head_keys & stored_keys(root / "tied")
    config = json.loads((root / "tied" / CONFIG_FILE).read_text())
    assert config["format"] == "qattune.quantized/2"
    assert config["tied_tensors"] == {"output.weight_packed": "tok_embeddings.weight_packed",
                                      "output.weight_scale": "tok_embeddings.weight_scale"}
    head_bytes = sum(t.numel() * t.element_size() for t in (model.output.weight_packed, model.output.weight_scale))
    saved = (root / "untied" / WEIGHTS_FILE).stat().st_size - (root / "tied" / WEIGHTS_FILE).stat().st_size
    assert head_bytes <= saved < head_bytes + 200  # the head's bytes, and a header two entries shorter
    loaded = load_model(root / "tied")
    for buffer in ("weight_packed", "weight_scale"):
        assert getattr(loaded.output, buffer).data_ptr() == getattr(loaded.tok_embeddings, buffer).data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(IDS), load_model(root / "untied")(IDS))


def test_tied_float_head_is_stored_once(tmp_path):
    """8w leaves the embedding in float and the tied head too (quantize_output=false): one tensor."""
    model = QATQuantizer("8w", quantize_output=False).convert(tiny(tie_embeddings=True))
    save(model, tmp_path)
    assert "output.weight" not in stored_keys(tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["tied_tensors"] == {"output.weight": "tok_embeddings.weight"}
    loaded = load_model(tmp_path)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_a_version_1_folder_still_loads(tied_q4_0, tmp_path):
    _, root = tied_q4_0
    shutil.copytree(root / "untied", tmp_path / "v1")
    config = json.loads((tmp_path / "v1" / CONFIG_FILE).read_text())
    config["format"] = "qattune.quantized/1"
    del config["tied_tensors"]
    (tmp_path / "v1" / CONFIG_FILE).write_text(json.dumps(config))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "v1")(IDS), load_model(root / "untied")(IDS))


def test_transformers_refuses_the_folder_and_qattune_reads_it(tied_q4_0):
    transformers = pytest.importorskip("transformers")
    _, root = tied_q4_0
    hf = json.loads((root / "tied" / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] is None
    assert hf["quantization_config"]["scheme"] == "q4_0" and hf["quantization_config"]["format"] == "qattune.quantized/2"
    assert hf["model_type"] == "llama" and hf["vocab_size"] == 260
    with pytest.raises(ValueError, match="has no `quant_method` attribute"):
        transformers.AutoModelForCausalLM.from_pretrained(str(root / "tied"))
    assert checkpoint_config(root / "tied").vocab_size == 260


def test_dtype_casts_the_float_parts_and_keeps_packed_codes_and_scales(tmp_path):
    model = QATQuantizer("8da4w", group_size=32).convert(tiny())
    save(model, tmp_path)
    stored = load_model(tmp_path)
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    assert stored.norm.weight.dtype == torch.float32 and stored.tok_embeddings.weight.dtype == torch.float32
    assert bf16.norm.weight.dtype == bf16.tok_embeddings.weight.dtype == torch.bfloat16
    q_proj, stored_q = bf16.layers[0].attn.q_proj, stored.layers[0].attn.q_proj
    assert torch.equal(q_proj.weight_packed, stored_q.weight_packed)
    assert q_proj.weight_scale.dtype == torch.float32 and torch.equal(q_proj.weight_scale, stored_q.weight_scale)
    assert q_proj.dequantized_weight().dtype == torch.bfloat16
    with torch.no_grad():
        low, full = bf16(IDS), stored(IDS)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert (low.float() - full).abs().max() < 0.05 * full.abs().max()


# --- broken folders: one line each, before any weight is read where the headers tell ----------------------

@pytest.fixture()
def folder(tmp_path):
    save(QATQuantizer("8da4w", group_size=32).convert(tiny()), tmp_path / "q")
    return tmp_path / "q"


def both_say(path, message):
    for load in (load_model, checkpoint_config):
        with pytest.raises(QattuneError) as err:
            load(path)
        assert str(err.value) == message


def test_missing_weights_file_is_one_line(folder):
    (folder / WEIGHTS_FILE).unlink()
    both_say(folder, f"{folder / WEIGHTS_FILE} does not exist: a quantized checkpoint holds model.safetensors "
                     "beside quantization_config.json; quantize the model again")


def test_truncated_weights_file_is_one_line(folder):
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    both_say(folder, f"cannot read safetensors file {folder / WEIGHTS_FILE}: Error while deserializing header: "
                     "incomplete metadata, file not fully covered")


def test_config_of_another_scheme_is_one_line(folder, tmp_path):
    save(QATQuantizer("8w").convert(tiny()), tmp_path / "other")
    shutil.copy(tmp_path / "other" / CONFIG_FILE, folder / CONFIG_FILE)
    both_say(folder, f"{folder / CONFIG_FILE}: layer 'layers.0.attn.k_proj' (int8_sym, [32, 64]) needs "
                     "layers.0.attn.k_proj.weight_packed [32, 64] int8, but the stored one is [32, 32]: the "
                     "config and model.safetensors do not belong together; "
                     "quantize the model again")


def test_config_that_is_not_json_is_one_line(folder):
    (folder / CONFIG_FILE).write_text("{scheme: 8da4w")
    with pytest.raises(QattuneError, match=rf"^{folder / CONFIG_FILE} is not valid JSON \(Expecting property name"):
        load_model(folder)
