"""GGUF export: raw Q4_0/Q8_0 blocks from converted modules, float tensors, metadata; read back with gguf."""

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.quant import QATQuantizer, write_gguf

T = gguf.GGMLQuantizationType


def converted_tiny(scheme="q4_0"):
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "tok_embeddings": nn.Embedding(96, 64),
        "wq": nn.Linear(64, 64, bias=False),
        "w1": nn.Linear(64, 128, bias=False),
        "w2": nn.Linear(128, 64, bias=False),
        "norm": nn.RMSNorm(64),
        "output": nn.Linear(64, 96, bias=False),
    })
    with torch.no_grad():
        model["norm"].weight.uniform_(0.5, 1.5)
    floats = {name: m.weight.detach().clone() for name, m in model.items()}
    quantizer = QATQuantizer(scheme)
    return quantizer.convert(quantizer.prepare(model)), floats


NAMES = {"tok_embeddings": "token_embd.weight", "wq": "blk.0.attn_q.weight", "w1": "blk.0.ffn_up.weight",
         "w2": "blk.0.ffn_down.weight", "norm": "output_norm.weight", "output": "output.weight"}
METADATA = {"llama.block_count": 1, "llama.context_length": 256, "llama.embedding_length": 64,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0}
TOKENIZER = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(96)],
             "tokenizer.ggml.token_type": [1] * 96, "tokenizer.ggml.bos_token_id": 1,
             "tokenizer.ggml.add_bos_token": False}


def export(tmp_path, model, float_type="f16"):
    tensors = {NAMES[name]: (m.weight if name == "norm" else m) for name, m in model.items()}
    path = write_gguf(tmp_path / "tiny.gguf", tensors, "llama", METADATA, TOKENIZER, float_type=float_type)
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, reader


def test_q4_0_export_dequantizes_exactly_to_qattune_weights(tmp_path):
    model, floats = converted_tiny()
    tensors, _ = export(tmp_path, model)
    assert {name: t.tensor_type for name, t in tensors.items()} == {
        "token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q4_0, "blk.0.ffn_up.weight": T.Q4_0,
        "blk.0.ffn_down.weight": T.Q4_0, "output_norm.weight": T.F32, "output.weight": T.Q8_0}
    for name, gguf_name in NAMES.items():
        t = tensors[gguf_name]
        read_back = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        ours = floats[name] if name == "norm" else model[name].dequantized_weight()
        assert tuple(read_back.shape) == tuple(ours.shape), gguf_name
        assert torch.equal(read_back, ours), gguf_name  # bit-exact, no requantization
        assert list(t.shape) == list(reversed(ours.shape))  # GGUF lists ne[0] (the row length) first


def test_q4_0_learned_scales_reach_the_file_as_trained(tmp_path):
    """Range learning on q4_0: the Q4_0 layers train their block scales (the Q8_0 embedding and head keep
    dynamic ones); the converted model and the GGUF file compute exactly the fake-quantized weights."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"tok_embeddings": nn.Embedding(96, 64), "wq": nn.Linear(64, 64, bias=False),
                           "w1": nn.Linear(64, 128, bias=False), "w2": nn.Linear(128, 64, bias=False),
                           "norm": nn.RMSNorm(64), "output": nn.Linear(64, 96, bias=False)})
    quantizer = QATQuantizer("q4_0", range_learning=True, range_init="cover")
    quantizer.prepare(model)
    learners = {name for name, m in model.items() if getattr(m, "weight_range_learner", None) is not None}
    assert learners == {"wq", "w1", "w2"}
    quantizer.set_fake_quant(model, True)  # starts the learned scales from the weights
    start = {name: model[name].weight_range_learner.scale.detach().clone() for name in learners}
    assert bool((start["wq"] < 0).any() and (start["wq"] > 0).any())  # both signs, as Q4_0's own
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 96, (4, 16))
    for _ in range(3):
        hidden = model["tok_embeddings"](tokens)
        hidden = model["w2"](torch.relu(model["w1"](model["wq"](hidden))))
        loss = nn.functional.cross_entropy(model["output"](model["norm"](hidden)).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(model[name].weight_range_learner.scale, start[name]) for name in learners)
    with torch.no_grad():
        trained = {name: model[name].weight_range_learner(model[name].weight) for name in learners}
    quantizer.convert(model)
    tensors, _ = export(tmp_path, model)
    for name in learners:
        t = tensors[NAMES[name]]
        assert t.tensor_type == T.Q4_0
        read_back = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert torch.equal(model[name].dequantized_weight(), trained[name])
        assert torch.equal(read_back, trained[name]), name


def test_q4_0_and_q8_0_blocks_are_llama_cpp_bytes(tmp_path):
    """Independent reference: gguf-py's quantizer (bit-exact with ggml-quants.c) on the float weights."""
    model, floats = converted_tiny()
    tensors, _ = export(tmp_path, model)
    for name, gguf_name in NAMES.items():
        t = tensors[gguf_name]
        if t.tensor_type in (T.Q4_0, T.Q8_0):
            expected = gguf.quants.quantize(floats[name].numpy(), t.tensor_type)
            assert np.array_equal(np.asarray(t.data), expected), gguf_name


def test_q4_0_block_layout_by_hand(tmp_path):
    """One block: d as float16 then byte j = q[j] | q[j + 16] << 4."""
    model, floats = converted_tiny()
    tensors, _ = export(tmp_path, model)
    raw = np.asarray(tensors["blk.0.attn_q.weight"].data)[0, :18]
    x = floats["wq"][0, :32]
    m = x[x.abs().argmax()]
    d = m / -8
    q = torch.clamp(torch.trunc(x * (1.0 / d) + 8.5), max=15).to(torch.uint8)
    assert raw[:2].view(np.float16)[0] == np.float16(d.item())
    assert np.array_equal(raw[2:], (q[:16] | (q[16:] << 4)).numpy())


@pytest.mark.parametrize("float_type,expected", [("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16)])
def test_float_layers_and_file_type(tmp_path, float_type, expected):
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    path = write_gguf(tmp_path / "f.gguf", {"blk.0.ffn_up.weight": weight, "output_norm.weight": torch.ones(64)},
                      "llama", METADATA, TOKENIZER, float_type=float_type)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    up = tensors["blk.0.ffn_up.weight"]
    assert up.tensor_type == expected and tensors["output_norm.weight"].tensor_type == T.F32
    read_back = torch.from_numpy(np.array(gguf.quants.dequantize(up.data, up.tensor_type), dtype=np.float32))
    rounded = {"f32": weight, "f16": weight.half().float(), "bf16": weight.bfloat16().float()}[float_type]
    assert torch.equal(read_back.reshape(32, 64), rounded)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[float_type]
    assert reader.fields["general.file_type"].contents() == int(file_type)


def test_metadata_types(tmp_path):
    model, _ = converted_tiny()
    _, reader = export(tmp_path, model)
    f = reader.fields
    V = gguf.GGUFValueType
    assert f["general.architecture"].contents() == "llama"
    assert f["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert f["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    assert f["llama.block_count"].types == [V.UINT32] and f["llama.block_count"].contents() == 1
    assert f["llama.attention.layer_norm_rms_epsilon"].types == [V.FLOAT32]
    assert f["tokenizer.ggml.tokens"].types == [V.ARRAY, V.STRING]
    assert f["tokenizer.ggml.tokens"].contents()[:3] == ["t0", "t1", "t2"]
    assert f["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32]
    assert f["tokenizer.ggml.add_bos_token"].types == [V.BOOL]


def test_non_gguf_formats_are_refused(tmp_path):
    model, _ = converted_tiny("8da4w")
    with pytest.raises(QattuneError, match=r"tensor 'blk.0.attn_q.weight' is quantized as int4_sym, which GGUF "
                                           r"cannot hold without requantizing"):
        write_gguf(tmp_path / "x.gguf", {"blk.0.attn_q.weight": model["wq"]}, "llama", METADATA, TOKENIZER)
    with pytest.raises(QattuneError, match=r"metadata key 'llama.rope.scaling' has a value of type dict"):
        write_gguf(tmp_path / "y.gguf", {}, "llama", {"llama.rope.scaling": {}}, TOKENIZER)
