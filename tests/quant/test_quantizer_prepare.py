"""QATQuantizer.prepare / set_fake_quant: module swapping, reports, filters, errors, cached weights, STE."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qattune.errors import QattuneError
from qattune.quant import FakeQuantEmbedding, FakeQuantLinear, PTQQuantizer, QATQuantizer


def tiny_model(dim=64, hidden=128, vocab=96, seed=0):
    """Names as in a Llama: tok_embeddings, layers.N.attn.{wq,wk,wv,wo}, layers.N.mlp.{w1,w2,w3}, output."""
    torch.manual_seed(seed)
    layers = nn.ModuleList(
        nn.ModuleDict({
            "attn": nn.ModuleDict({n: nn.Linear(dim, dim, bias=False) for n in ("wq", "wk", "wv", "wo")}),
            "mlp": nn.ModuleDict({"w1": nn.Linear(dim, hidden, bias=False), "w3": nn.Linear(dim, hidden, bias=False),
                                  "w2": nn.Linear(hidden, dim, bias=False)}),
        })
        for _ in range(2)
    )
    return nn.ModuleDict({"tok_embeddings": nn.Embedding(vocab, dim), "layers": layers,
                          "output": nn.Linear(dim, vocab, bias=False)})


def torchao_8da4w_reference(x, w, group=32):
    """Independent torchao formulas: int4 symmetric per-group weight, int8 asymmetric per-token input."""
    eps = torch.finfo(torch.float32).eps
    wg = w.reshape(w.shape[0], -1, group)
    w_scale = (wg.abs().amax(-1, keepdim=True) / 7.5).clamp(min=eps)
    w_hat = (torch.round(wg * (1.0 / w_scale)).clamp(-8, 7) * w_scale).reshape(w.shape)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    x_scale = ((hi - lo) / 255).clamp(min=eps)
    zp = (-128 - torch.round(lo / x_scale)).clamp(-128, 127)
    q = (torch.round(x * (1.0 / x_scale)) + zp).clamp(-128, 127)
    return F.linear((q - zp) * x_scale, w_hat)


def test_prepare_swaps_layers_and_reports():
    model = tiny_model()
    quantizer = QATQuantizer("8da4w")
    assert quantizer.prepare(model) is model
    assert isinstance(model["layers"][0]["attn"]["wq"], FakeQuantLinear)
    assert isinstance(model["output"], FakeQuantLinear)
    assert type(model["tok_embeddings"]) is nn.Embedding
    report = quantizer.report
    assert report.counts() == {"Linear:int4_sym": 15, "skipped": 1}
    text = str(report)
    assert "qattune prepare report, scheme 8da4w: 15 quantized, 1 skipped" in text
    assert "Linear     int4_sym       int8_asym         15" in text
    assert "skipped Embedding tok_embeddings: embedding (quantize_embedding=false)" in text
    assert report.to_dict()["layers"][0] == {
        "name": "tok_embeddings", "kind": "Embedding", "shape": (96, 64), "quantized": False,
        "weight_format": None, "activation_format": None, "reason": "embedding (quantize_embedding=false)"}


def test_prepare_keeps_parameters_and_state_dict_keys():
    model = tiny_model()
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    QATQuantizer("8da4w").prepare(model)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params


def test_include_and_exclude_filters():
    model = tiny_model()
    quantizer = QATQuantizer("8da4w", exclude=[r"\.w2$", "^output$"])
    quantizer.prepare(model)
    reasons = {r.name: r.reason for r in quantizer.report.skipped}
    assert reasons == {"tok_embeddings": "embedding (quantize_embedding=false)",
                       "layers.0.mlp.w2": r"matched exclude '\.w2$'", "layers.1.mlp.w2": r"matched exclude '\.w2$'",
                       "output": "matched exclude '^output$'"}
    assert type(model["layers"][1]["mlp"]["w2"]) is nn.Linear

    quantizer = QATQuantizer("8da4w", include=[r"^layers\.0\."])
    quantizer.prepare(tiny_model())
    assert sorted(r.name for r in quantizer.report.quantized) == sorted(
        f"layers.0.{p}" for p in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3"))
    assert {r.reason for r in quantizer.report.skipped} == {
        "not matched by include", "embedding (quantize_embedding=false)"}


def test_bad_regex_is_a_clear_error():
    with pytest.raises(QattuneError, match=r"quantizer option exclude: '\(w2' is not a valid regular expression"):
        QATQuantizer("8da4w", exclude=["(w2"])


def test_group_size_that_does_not_divide_a_layer_names_it():
    model = tiny_model()
    model["layers"][1]["mlp"]["w2"] = nn.Linear(100, 64)
    with pytest.raises(QattuneError) as err:
        QATQuantizer("8da4w", group_size=32).prepare(model)
    assert str(err.value) == (
        "layer 'layers.1.mlp.w2': in_features 100 is not divisible by the int4_sym block size 32 of scheme "
        "'8da4w'; pick a group_size that divides it, or keep it in float with exclude=['^layers.1.mlp.w2$']")
    assert type(model["layers"][0]["attn"]["wq"]) is nn.Linear  # nothing was swapped
    QATQuantizer("8da4w", exclude=[r"^layers\.1\.mlp\.w2$"]).prepare(model)  # the advice works


def test_fixed_block_scheme_error_counts_other_layers():
    model = tiny_model(dim=48, hidden=80)
    with pytest.raises(QattuneError, match=r"^layer 'layers.0.attn.wq': in_features 48 is not divisible by the "
                                           r"mxfp4 block size 32 of scheme 'mxfp4' \(and 14 more layers\); keep"):
        QATQuantizer("mxfp4", quantize_output=True).prepare(model)


def test_fake_quant_forward_matches_torchao_formulas_and_toggles_off_exactly():
    model = tiny_model()
    layer = model["layers"][0]["mlp"]["w1"]
    float_weight = layer.weight.detach().clone()
    quantizer = QATQuantizer("8da4w")
    quantizer.prepare(model)
    fq = model["layers"][0]["mlp"]["w1"]
    x = torch.randn(3, 5, 64) * 2
    torch.testing.assert_close(fq(x), torchao_8da4w_reference(x, float_weight), rtol=0, atol=1e-5)
    quantizer.set_fake_quant(model, False)
    assert torch.equal(fq(x), F.linear(x, float_weight))
    quantizer.set_fake_quant(model, True)
    assert not torch.equal(fq(x), F.linear(x, float_weight))


def _count_weight_fake_quant(module, monkeypatch):
    calls = []
    original = module.weight_format.fake_quantize_with_mask

    def counting(x):
        calls.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(module.weight_format, "fake_quantize_with_mask", counting)
    return calls


@pytest.mark.parametrize("optimizer_kwargs", [{"foreach": False}, {"fused": True}])
def test_weight_fake_quant_is_cached_until_the_optimizer_step(monkeypatch, optimizer_kwargs):
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    QATQuantizer("4w", group_size=32).prepare(model)
    layer = model[0]
    calls = _count_weight_fake_quant(layer, monkeypatch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, **optimizer_kwargs)
    x = torch.randn(4, 64)
    for _ in range(3):  # three micro-batches: one weight fake quant
        model(x).square().sum().backward()
    assert calls == [(32, 64)]
    optimizer.step()
    model(x)
    assert calls == [(32, 64), (32, 64)]
    fresh = layer.weight_format.fake_quantize(layer.weight.detach())
    assert torch.equal(layer.fake_quantized_weight(), fresh)
    with torch.no_grad():
        layer.weight.add_(0.5)  # any in-place update invalidates too
    assert torch.equal(layer.fake_quantized_weight(), layer.weight_format.fake_quantize(layer.weight.detach()))


def test_cached_weight_gradient_is_the_straight_through_gradient():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        linear.weight[3, 5] = 127.5  # row 3's amax: scale = 127.5 / 127.5 = 1, and round(127.5) = 128 > 127
    weight = linear.weight.detach().clone().requires_grad_(True)
    model = nn.Sequential(linear)
    QATQuantizer("8w").prepare(model)  # weight-only per-channel int8: scale = amax / 127.5
    QATQuantizer("8da4w").prepare(nn.Sequential())  # unrelated quantizers do not interfere
    x = torch.randn(8, 64)
    grad_out = torch.randn(8, 16)
    for _ in range(2):  # gradient accumulation through the same cached weight
        model(x).backward(grad_out)
    # reference: w_hat = clamp(round(w / s), -128, 127) * s, d w_hat / d w = 1 unless clipped
    s = weight.detach().abs().amax(-1, keepdim=True) / 127.5
    q = torch.round(weight.detach() * (1.0 / s))
    in_range = (q >= -128) & (q <= 127)
    expected = 2 * (grad_out.t() @ x) * in_range
    torch.testing.assert_close(linear.weight.grad, expected)
    assert linear.weight.grad[3, 5] == 0 and not in_range[3, 5]
    assert (~in_range).sum(-1).max() == 1  # symmetric per-row scales clip at most the row's amax


def test_embedding_fake_quant_q4_0_scheme_uses_q8_0_blocks():
    model = tiny_model()
    quantizer = QATQuantizer("q4_0")
    quantizer.prepare(model)
    embedding = model["tok_embeddings"]
    assert isinstance(embedding, FakeQuantEmbedding)
    ids = torch.tensor([[1, 5, 95]])
    w = embedding.weight.detach()[ids[0]].reshape(3, 2, 32)
    d = w.abs().amax(-1, keepdim=True) / 127
    v = w * (1.0 / d)
    q = torch.copysign(torch.floor(v.abs() + 0.5), v)  # roundf; no exact .5 ties in random data
    expected = (q * d.half().float()).reshape(1, 3, 64)
    assert torch.equal(embedding(ids), expected)
    assert quantizer.report.counts() == {"Embedding:q8_0": 1, "Linear:q4_0": 14, "Linear:q8_0": 1}


def test_range_learning_learns_scales_and_convert_uses_them():
    model = nn.Sequential(nn.Linear(64, 16))
    quantizer = QATQuantizer("8da4w", range_learning=True)
    quantizer.prepare(model)
    layer = model[0]
    learner = layer.weight_range_learner
    assert tuple(learner.scale.shape) == (16, 2)
    x = torch.randn(4, 64)
    model(x).sum().backward()
    assert learner.scale.grad is not None and learner.scale.grad.abs().sum() > 0
    with torch.no_grad():
        learner.scale.mul_(1.5)
    weight = layer.weight.detach().clone()
    learned_scale = learner.scale.detach().clone()
    quantizer.convert(model)
    q = torch.round(weight.reshape(16, 2, 32) * (1.0 / learned_scale.unsqueeze(-1))).clamp(-8, 7)
    assert torch.equal(model[0].dequantized_weight(), (q * learned_scale.unsqueeze(-1)).reshape(16, 64))


def test_range_learning_refused_for_float_schemes():
    with pytest.raises(QattuneError, match=r"range_learning=true: scheme 'fp8' quantizes weights with "
                                           r"float8_rowwise, which has no integer grid to learn scales on"):
        QATQuantizer("fp8", range_learning=True).prepare(nn.Sequential(nn.Linear(64, 16)))
    with pytest.raises(QattuneError, match=r"scheme 'q8_0' quantizes weights with q8_0, which has no integer grid"):
        QATQuantizer("q8_0", range_learning=True).prepare(nn.Sequential(nn.Linear(64, 16)))


def test_ptq_prepare_is_the_same_fake_quantization():
    a, b = tiny_model(), tiny_model()
    QATQuantizer("nvfp4").prepare(a)
    PTQQuantizer("nvfp4").prepare(b)
    x = torch.randn(2, 64)
    assert torch.equal(a["layers"][0]["mlp"]["w1"](x), b["layers"][0]["mlp"]["w1"](x))


def test_qkv_reading_one_input_quantize_it_once_with_exact_gradients(monkeypatch):
    model = tiny_model()
    QATQuantizer("8da4w").prepare(model)
    attn = model["layers"][0]["attn"]
    shared = attn["wq"].activation_fake_quant
    assert shared is attn["wk"].activation_fake_quant is model["layers"][1]["mlp"]["w1"].activation_fake_quant
    calls = []
    original = shared.format.fake_quantize_with_mask
    monkeypatch.setattr(shared.format, "fake_quantize_with_mask", lambda x: calls.append(1) or original(x))
    x = (torch.randn(2, 8, 64) * 3).requires_grad_(True)
    q, k, v = (attn[n](x) for n in ("wq", "wk", "wv"))
    assert len(calls) == 1
    (q * k * v).sum().backward()
    shared_grad = x.grad.clone()
    y = x.detach().clone().add_(0).requires_grad_(True)  # a different tensor: quantized again, no sharing
    reference = [torchao_8da4w_reference(y, attn[n].weight.detach()) for n in ("wq", "wk", "wv")]
    q_ref, k_ref, v_ref = (attn[n](y) for n in ("wq", "wk", "wv"))
    for out, ref in zip((q_ref, k_ref, v_ref), reference):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    (q_ref * k_ref * v_ref).sum().backward()
    assert torch.equal(shared_grad, y.grad)
    with torch.no_grad():
        x.mul_(2)  # an in-place change of the input is seen
    attn["wq"](x)
    assert len(calls) == 3


def test_compiled_model_reads_the_cache_refreshed_by_the_root_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    QATQuantizer("8da4w").prepare(model)
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    x = torch.randn(8, 64)
    for _ in range(3):
        out = compiled(x)
        assert model[0]._compiled_reads_cache and model[2]._compiled_reads_cache
        with torch.no_grad():  # eager, recomputed from the current weights
            h = torch.relu(torchao_8da4w_reference(x, model[0].weight.detach()) + model[0].bias)
            expected = torchao_8da4w_reference(h, model[2].weight.detach()) + model[2].bias
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
        out.square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_the_same_input_tensor_across_training_steps():
    """A shared activation result is never reused after backward consumed its graph."""
    model = nn.Sequential(nn.Linear(64, 32))
    QATQuantizer("8da8w").prepare(model)
    x = torch.randn(4, 64, requires_grad=True)
    for _ in range(3):
        model[0](x).sum().backward()  # the sub-module directly: no root hook
    grads = x.grad.clone()
    x.grad = None
    model[0](x).sum().backward()
    torch.testing.assert_close(grads, 3 * x.grad)


def test_fake_quant_model_runs_under_inference_mode():
    model = tiny_model()
    QATQuantizer("8da4w").prepare(model)
    x = torch.randn(2, 64)
    expected = model["layers"][0]["attn"]["wq"](x)
    model = tiny_model()
    QATQuantizer("8da4w").prepare(model)
    with torch.inference_mode():  # evaluation first fills the weight cache...
        assert torch.equal(model["layers"][0]["attn"]["wq"](x.clone()), expected)
    model["layers"][0]["attn"]["wq"](x).sum().backward()  # ...which training then reuses
    assert model["layers"][0]["attn"]["wq"].weight.grad is not None


def test_output_head_inside_a_wrapper_is_still_the_output_head():
    class Wrapper(nn.Module):  # e.g. a LoRA adapter holding the frozen head as `base`
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    model = tiny_model()
    model["output"] = Wrapper(model["output"])
    quantizer = QATQuantizer("nf4")  # keeps the output head in float by default
    quantizer.prepare(model)
    assert type(model["output"].base) is nn.Linear
    assert {r.name: r.reason for r in quantizer.report.skipped}["output.base"] == "output head (quantize_output=false)"
