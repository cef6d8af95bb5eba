"""The invariant: convert(prepare(model)) computes what the fake-quantized model computed, for every
scheme; packed storage; save -> load reproduces the logits without float weights."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qattune.errors import QattuneError
from qattune.quant import (
    SCHEMES,
    FakeQuantEmbedding,
    FakeQuantLinear,
    PTQQuantizer,
    QATQuantizer,
    QuantizedEmbedding,
    QuantizedLinear,
    load_quantized,
    read_quantization_config,
    save_quantized,
)


class TinyLM(nn.Module):
    """2 blocks, width 64: embedding, attention-like and MLP Linears (some with bias), RMS norm, output head."""

    def __init__(self, vocab=128, dim=64, hidden=128):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"wq": nn.Linear(dim, dim), "wo": nn.Linear(dim, dim, bias=False),
                           "w1": nn.Linear(dim, hidden, bias=False), "w2": nn.Linear(hidden, dim),
                           "norm": nn.RMSNorm(dim)})
            for _ in range(2)
        )
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.tok_embeddings(ids)
        for block in self.layers:
            x = block["norm"](h)
            h = h + block["wo"](torch.tanh(block["wq"](x)))
            h = h + block["w2"](F.silu(block["w1"](x)))
        return self.output(h)


def options(scheme):
    """Quantize everything (embeddings and head too), with group sizes that fit width 64."""
    return {"group_size": 32 if scheme == "4w" else None, "quantize_embedding": True, "quantize_output": True}


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


IDS = torch.tensor([[1, 7, 3, 99, 127, 0, 64, 5], [2, 2, 8, 9, 10, 11, 12, 13]])

# scheme: (packed dtype, packed bytes per row of 64 inputs, scale dtype, zero dtype or None)
STORAGE = {
    "8da4w": (torch.uint8, 32, torch.float32, None),
    "4w": (torch.uint8, 32, torch.bfloat16, torch.bfloat16),
    "8w": (torch.int8, 64, torch.float32, None),
    "8da8w": (torch.int8, 64, torch.float32, None),
    "fp8": (torch.float8_e4m3fn, 64, torch.float32, None),
    "mxfp8": (torch.float8_e4m3fn, 64, torch.uint8, None),
    "mxfp4": (torch.uint8, 32, torch.uint8, None),
    "nvfp4": (torch.uint8, 32, torch.float8_e4m3fn, None),
    "q4_0": (torch.uint8, 32, torch.float16, None),
    "q8_0": (torch.int8, 64, torch.float16, None),
    "nf4": (torch.uint8, 32, torch.float32, None),
}


def without_kernels(model):
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernels = False
    return model


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_convert_equals_fake_quant_and_save_load_reproduces_it(scheme, tmp_path):
    model = tiny_lm()
    quantizer = QATQuantizer(scheme, **options(scheme))
    quantizer.prepare(model)
    with torch.no_grad():
        fake_logits = model(IDS)
        fake_weights = {n: m.fake_quantized_weight().clone() for n, m in model.named_modules()
                        if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))}
    quantizer.convert(model)
    converted = dict(model.named_modules())
    quantized = {n for n, m in converted.items() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    assert set(fake_weights) == quantized
    assert not any(isinstance(p, nn.Parameter) and p.dim() == 2 for p in model.parameters())  # no float weights left
    for name, fake_weight in fake_weights.items():
        assert torch.equal(converted[name].dequantized_weight(), fake_weight), name  # bit-exact

    with torch.no_grad():
        assert torch.equal(without_kernels(model)(IDS), fake_logits)  # dequantize path: same ops, same order
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.use_kernels = True
        kernel_logits = model(IDS)
    if scheme != "8da8w":  # the int8 GEMM rounds differently, which can flip a later activation code
        torch.testing.assert_close(kernel_logits, fake_logits, rtol=1e-4, atol=1e-4)

    save_quantized(model, tmp_path)
    with torch.device("meta"):
        skeleton = TinyLM()
    loaded = load_quantized(skeleton, tmp_path)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    with torch.no_grad():
        assert torch.equal(loaded(IDS), kernel_logits)


@pytest.mark.parametrize("scheme", sorted(STORAGE))
def test_packed_storage_and_scale_dtypes(scheme):
    model = QATQuantizer(scheme, **options(scheme)).convert(tiny_lm())
    packed_dtype, row_bytes, scale_dtype, zero_dtype = STORAGE[scheme]
    layer = model.layers[0]["wq"]
    assert layer.weight_packed.dtype == packed_dtype
    assert tuple(layer.weight_packed.shape) == (64, row_bytes)
    assert layer.weight_scale.dtype == scale_dtype
    assert (layer.weight_zero.dtype if layer.weight_zero is not None else None) == zero_dtype
    assert (layer.weight_global_scale is not None) == (scheme == "nvfp4")


def test_int4_packing_is_two_codes_per_byte_low_nibble_first():
    model = PTQQuantizer("8da4w").convert(tiny_lm())
    layer = model.layers[0]["wq"]
    w = tiny_lm().layers[0]["wq"].weight.detach()
    scale = w.reshape(64, 2, 32).abs().amax(-1, keepdim=True) / 7.5
    codes = (torch.round(w.reshape(64, 2, 32) * (1.0 / scale)).clamp(-8, 7) + 8).to(torch.uint8).reshape(64, 64)
    assert torch.equal(layer.weight_packed, codes[:, 0::2] | (codes[:, 1::2] << 4))


def test_ptq_convert_equals_qat_convert_of_an_untrained_model():
    qat = QATQuantizer("nvfp4", quantize_output=True)
    a = qat.convert(qat.prepare(tiny_lm()))
    b = PTQQuantizer("nvfp4", quantize_output=True).convert(tiny_lm())
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))


def test_convert_report_and_saved_config(tmp_path):
    quantizer = QATQuantizer("q4_0", exclude=[r"layers\.1\.w2"])
    model = quantizer.convert(quantizer.prepare(tiny_lm()))
    assert quantizer.report.stage == "convert"
    assert quantizer.report.counts() == {"Embedding:q8_0": 1, "Linear:q4_0": 7, "Linear:q8_0": 1, "skipped": 1}
    assert type(model.layers[1]["w2"]) is nn.Linear
    save_quantized(model, tmp_path)
    config = read_quantization_config(tmp_path)
    assert config["quantization"]["scheme"] == "q4_0" and config["quantization"]["group_size"] is None
    assert config["skipped_layers"] == [
        {"name": "layers.1.w2", "kind": "Linear", "reason": r"matched exclude 'layers\.1\.w2'"}]
    assert config["quantized_layers"]["output"] == {
        "kind": "Linear", "in_features": 64, "out_features": 128, "bias": False,
        "weight_format": "q8_0", "activation_format": None, "weight_dtype": "float32"}
    assert config["quantized_layers"]["tok_embeddings"]["weight_format"] == "q8_0"


def test_convert_of_a_model_prepared_with_other_filters_restores_float_layers():
    model = QATQuantizer("8w").prepare(tiny_lm())
    float_w2 = model.layers[0]["w2"].weight
    QATQuantizer("8w", exclude=["w2"]).convert(model)
    restored = model.layers[0]["w2"]
    assert type(restored) is nn.Linear and restored.weight is float_w2


def test_load_into_a_different_architecture_is_a_clear_error(tmp_path):
    save_quantized(QATQuantizer("8w").convert(tiny_lm()), tmp_path)
    other = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(QattuneError, match=r"quantized layer 'layers.0.w1' does not exist in the model"):
        load_quantized(other, tmp_path)
    with pytest.raises(QattuneError, match="run quantizer.convert"):
        save_quantized(tiny_lm(), tmp_path / "x")


def test_quantized_embedding_reads_only_looked_up_rows():
    model = QATQuantizer("nf4", quantize_embedding=True).convert(tiny_lm())
    embedding = model.tok_embeddings
    full = embedding.dequantized_weight()
    assert torch.equal(embedding(IDS), full[IDS])


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_convert_equals_fake_quant_in_bfloat16(scheme):
    model = tiny_lm().to(torch.bfloat16)
    quantizer = QATQuantizer(scheme, **options(scheme))
    quantizer.prepare(model)
    with torch.no_grad():
        fake_logits = model(IDS)
        fake_weights = {n: m.fake_quantized_weight().clone() for n, m in model.named_modules()
                        if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))}
    quantizer.convert(model)
    converted = dict(model.named_modules())
    for name, fake_weight in fake_weights.items():
        assert fake_weight.dtype == torch.bfloat16
        assert torch.equal(converted[name].dequantized_weight(torch.bfloat16), fake_weight), name
    with torch.no_grad():
        logits = without_kernels(model)(IDS)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, fake_logits)
