"""AWQ channel scaling before GPTQ: exact in float, errors against direct output sums, the chosen alphas."""

import pytest
import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.models import llama
from qattune.quant import QATQuantizer
from qattune.quant.awq import ALPHAS, awq_scale_block
from qattune.quant.gptq import _calibrate, _first_block_inputs

LAYERS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def prepared_model(qkv_bias=False, num_heads=6, num_kv_heads=2, seed=0):
    torch.manual_seed(seed)
    model = llama(vocab_size=96, num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads, embed_dim=96,
                  intermediate_dim=128, max_seq_len=64, qkv_bias=qkv_bias)
    quantizer = QATQuantizer("8da4w", group_size=32, range_learning=True, range_init="cover", rounding_init="gptq",
                             awq_scaling=True)
    quantizer.prepare(model)
    quantizer.set_fake_quant(model, False)
    return model.eval(), quantizer


def calibration(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, 96, (2, 24), generator=g)} for _ in range(n)]


def block_inputs(model, batches):
    with torch.no_grad():
        return _first_block_inputs(model, batches, (), torch.device("cpu"))


def block_stats(block, inputs):
    """GPTQ's calibration statistics of the block's quantized layers, by module."""
    modules = {n: m for n, m in block.named_modules() if getattr(m, "weight_range_learner", None) is not None}
    stats, _ = _calibrate(block, inputs, modules, keep_outputs=False)
    return {modules[n]: layer_stats for n, layer_stats in stats.items()}


def cover_rounding(w):
    """int4 symmetric, group 32, scale = max(max / 7, min / -8) per group: written out, not qattune's."""
    groups = w.reshape(w.shape[0], -1, 32)
    scale = torch.maximum(groups.amax(-1).clamp(min=0) / 7, groups.amin(-1).clamp(max=0) / -8).clamp(min=1e-9)
    codes = torch.clamp(torch.round(groups / scale.unsqueeze(-1)), -8, 7)
    return (codes * scale.unsqueeze(-1)).reshape(w.shape)


def direct_rounding_error(block, inputs, row_factors=None):
    """Σ over the calibration tokens and the block's seven layers of |x Wᵀ - x Q(W)ᵀ|², from the layers'
    actual inputs; `row_factors` multiply a layer's output errors back into the original basis."""
    row_factors = row_factors or {}
    captured = {name: [] for name in LAYERS}
    modules = dict(block.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: captured[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in LAYERS]
    with torch.no_grad():
        for args in inputs:
            block(*args)
    for h in hooks:
        h.remove()
    total = 0.0
    for name in LAYERS:
        x, w = torch.cat(captured[name]).double(), modules[name].weight.detach().double()
        error = x @ w.T - x @ cover_rounding(w.float()).double().T
        total += float((error * row_factors.get(name, torch.ones(())).double()).square().sum())
    return total


@pytest.mark.parametrize("qkv_bias, num_heads, num_kv_heads", [(False, 6, 2), (True, 6, 3), (False, 3, 3)])
def test_scaling_leaves_the_float_model_unchanged(qkv_bias, num_heads, num_kv_heads):
    model, _ = prepared_model(qkv_bias, num_heads, num_kv_heads)
    batches = calibration()
    with torch.no_grad():
        before = [model(b["tokens"]) for b in batches]
    inputs = block_inputs(model, batches)
    for block in model.layers:
        with torch.no_grad():
            outputs = [block(*args) for args in inputs]
        awq_scale_block(block, block_stats(block, inputs))
        inputs = [(out, *args[1:]) for out, args in zip(outputs, inputs)]
    with torch.no_grad():
        after = [model(b["tokens"]) for b in batches]
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.layers[0].attn_norm.weight, torch.ones(96))  # something was scaled


def test_reported_errors_equal_the_output_errors_summed_directly():
    model, _ = prepared_model()
    inputs = block_inputs(model, calibration())
    block = model.layers[0]
    unscaled = direct_rounding_error(block, inputs)
    result = awq_scale_block(block, block_stats(block, inputs))
    assert result.unscaled_error == pytest.approx(unscaled, rel=1e-4)
    rows = {"attn.v_proj": result.factors["o"], "mlp.up_proj": result.factors["down"]}
    assert result.error == pytest.approx(direct_rounding_error(block, inputs, rows), rel=1e-4)
    assert result.error <= result.unscaled_error
    assert set(result.alphas) == {"qkv", "o", "gate_up", "down"} and set(result.alphas.values()) <= set(ALPHAS)
    # the learned scales start again from the scaled weights: the cover scales of the new weights
    q = block.attn.q_proj
    torch.testing.assert_close(q.weight_range_learner.fake_quantize_as_initialized(q.weight.detach()),
                               cover_rounding(q.weight.detach()))


def test_the_rescaled_statistics_are_those_of_the_scaled_block():
    model, _ = prepared_model()
    inputs = block_inputs(model, calibration())
    block = model.layers[0]
    stats = block_stats(block, inputs)
    awq_scale_block(block, stats)
    fresh = block_stats(block, inputs)
    for module, rescaled in stats.items():
        torch.testing.assert_close(rescaled.hessian, fresh[module].hessian, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rescaled.abs_sum, fresh[module].abs_sum, rtol=1e-4, atol=1e-4)


def test_an_outlier_input_channel_is_scaled_up_and_the_error_falls():
    model, _ = prepared_model()
    block = model.layers[0]
    with torch.no_grad():
        block.attn_norm.weight[5] = 30.0  # channel 5 of q/k/v's input is 30x the others
        gain = block.attn_norm.weight.detach().clone()
    inputs = block_inputs(model, calibration())
    result = awq_scale_block(block, block_stats(block, inputs))
    assert result.alphas["qkv"] > 0
    assert result.error < 0.5 * result.unscaled_error
    factors = gain / block.attn_norm.weight.detach()  # the gain was divided by the factors
    assert int(factors.argmax()) == 5


def test_gptq_initialize_reports_the_scaling_and_keeps_layers_unquantized_elsewhere():
    model, quantizer = prepared_model()
    report = quantizer.initialize_rounding(model, iter(calibration()))
    assert report.awq_ratio is not None and report.awq_ratio <= 1.0
    assert f"(AWQ scaling alone: {report.awq_ratio:.2f}x)" in str(report)
    assert report.error_ratio < 1.0
    norms = [block.attn_norm.weight for block in model.layers] + [block.mlp_norm.weight for block in model.layers]
    assert any(not torch.equal(norm, torch.ones(96)) for norm in norms)
    assert torch.equal(model.norm.weight, torch.ones(96))  # the final norm feeds the head: never scaled


def test_awq_scaling_options_are_checked():
    with pytest.raises(QattuneError, match="awq_scaling scales each block's channels in GPTQ's calibration pass; "
                                           "add rounding_init=gptq"):
        QATQuantizer("8da4w", range_learning=True, awq_scaling=True)

    class NotLlama(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(4, 4)

    with pytest.raises(QattuneError, match="needs Llama-style transformer blocks; this block has no attn_norm"):
        awq_scale_block(NotLlama(), {})
    model, _ = prepared_model()
    model.layers[0].mlp_norm = nn.LayerNorm(96)
    with pytest.raises(QattuneError, match="folds its factors into qattune's RMSNorm gains; mlp_norm is a LayerNorm"):
        awq_scale_block(model.layers[0], {})
