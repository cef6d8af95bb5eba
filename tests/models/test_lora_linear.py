"""LoRALinear on its own: init, the forward formula, dropout, merging, and what it refuses."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qattune.errors import QattuneError
from qattune.models import LoRALinear

torch.set_num_threads(1)


def make_layer(in_features=64, out_features=48, rank=4, alpha=8.0, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias)
    layer = LoRALinear(base, rank, alpha, dropout)
    with torch.no_grad():
        layer.lora_b.normal_(0.0, 0.5)  # a trained adapter: B no longer zero
    return base, layer


def test_init_kaiming_a_zero_b_and_frozen_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    layer = LoRALinear(base, rank=8, alpha=16.0)
    bound = 1.0 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64, as nn.Linear initialises weights
    assert layer.lora_a.shape == (8, 64) and layer.lora_b.shape == (48, 8)
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > 0.9 * bound
    assert layer.lora_a.std() > 0.5 * bound / math.sqrt(3)  # spread over the range, not a constant
    assert torch.count_nonzero(layer.lora_b) == 0
    assert layer.scale == 2.0
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_a.requires_grad and layer.lora_b.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]


def test_fresh_adapter_is_exactly_the_base():
    torch.manual_seed(1)
    base = nn.Linear(64, 48)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), base(x))


def test_forward_is_base_plus_scaled_low_rank_term():
    base, layer = make_layer(rank=4, alpha=12.0)
    x = torch.randn(2, 7, 64)
    w, b, a, bb = base.weight, base.bias, layer.lora_a, layer.lora_b
    expected = x @ w.T + b + (x @ a.T @ bb.T) * (12.0 / 4)
    out = layer(x)
    assert (out - base(x)).abs().max() > 0.1  # the adapter contributes
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)


def test_dropout_applies_to_the_adapter_input_only():
    base, layer = make_layer(dropout=0.5)
    x = torch.randn(4, 64)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    torch.manual_seed(3)
    out = layer.train()(x)
    expected = base(x) + (dropped @ layer.lora_a.T @ layer.lora_b.T) * layer.scale
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    no_dropout = base(x) + (x @ layer.lora_a.T @ layer.lora_b.T) * layer.scale
    assert not torch.allclose(out, no_dropout, atol=1e-3)
    assert torch.allclose(layer.eval()(x), no_dropout, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_merged_linear_computes_the_same(bias):
    base, layer = make_layer(bias=bias)
    merged = layer.merged_linear()
    assert type(merged) is nn.Linear and merged.in_features == 64 and merged.out_features == 48
    expected_weight = base.weight + layer.lora_b @ layer.lora_a * layer.scale
    assert torch.allclose(merged.weight, expected_weight, atol=1e-6, rtol=0)
    assert (merged.bias is None) == (not bias)
    x = torch.randn(5, 64)
    assert torch.allclose(merged(x), layer(x), atol=1e-5, rtol=0)
    assert layer.merged_weight(torch.bfloat16).dtype == torch.bfloat16


def test_adapter_dtype_follows_argument_and_base():
    base = nn.Linear(32, 16).to(torch.bfloat16)
    assert LoRALinear(base, 2, 4.0).lora_a.dtype == torch.bfloat16
    layer = LoRALinear(nn.Linear(32, 16), 2, 4.0, dtype=torch.float64)
    assert layer.lora_b.dtype == torch.float64
    assert layer(torch.randn(3, 32)).dtype == torch.float32  # output in the base's dtype


def test_base_without_linear_shape_is_refused():
    with pytest.raises(QattuneError) as err:
        LoRALinear(nn.ReLU(), 4, 8.0)
    assert str(err.value) == "LoRA needs a linear layer with in_features/out_features; got ReLU"
