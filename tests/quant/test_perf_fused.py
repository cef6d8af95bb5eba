"""The compiled (fused) fake quantization gives the eager numbers bit for bit, and is used where meant."""

import pytest
import torch
from torch import nn

from qattune.quant import QATQuantizer
from qattune.quant.modules import fused
from qattune.quant.schemes import SCHEMES, resolve_scheme_config

ROWS, WIDTH = 128, 512  # 65536 elements: exactly the size from which the compiled path is taken


@pytest.fixture(autouse=True)
def _fused_on():
    fused.set_fused_fake_quant(True)
    yield
    fused.set_fused_fake_quant(True)
    assert not fused._failed, "a format fell back to the eager path"


def _hard_tensor(shape, dtype=torch.float32, seed=0):
    """Random rows of very different ranges, an all-zero block, an outlier, exact ties at .5 steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 4
    flat = x.view(-1, shape[-1])
    flat[0, :64] = 0.0
    flat[1, 7] = 300.0
    flat[2, :32] = torch.arange(32) * 0.5 - 8.0
    flat[3] = -flat[3].abs()
    return x.to(dtype)


def _bits(t):
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16)
    return t


def _assert_same(fmt, x):
    with torch.no_grad():
        y_fused, clipped_fused = fused.fake_quantize_clipped(fmt, x)
        y_eager, mask_eager = fmt.fake_quantize_with_mask(x)
    assert f"_fake_quantize_bytes:{fmt!r}" in fused._compiled, "the compiled path was not taken"
    assert y_fused.dtype == y_eager.dtype and y_fused.shape == y_eager.shape
    assert torch.equal(_bits(y_fused), _bits(y_eager))  # bit for bit, signed zeros included
    if mask_eager is None:
        assert clipped_fused is None
    else:
        assert clipped_fused.dtype == torch.bool
        assert torch.equal(clipped_fused, ~mask_eager)
    return mask_eager


def _formats(scheme):
    config = resolve_scheme_config(scheme, quantize_activations=None)
    formats = [config.weight_format("Linear", False)]
    if config.activation_format() is not None:
        formats.append(config.activation_format())
    return formats


def _assert_into_same(fmt, x):
    """The in-place variant writes the eager values and the negated mask into the given buffers."""
    out = torch.full_like(x, float("nan"))
    clipped = torch.ones(x.shape, dtype=torch.bool)
    with torch.no_grad():
        y_eager, mask_eager = fmt.fake_quantize_with_mask(x)
        assert fused.fake_quantize_into(fmt, x, out, None if mask_eager is None else clipped)
    assert f"_fake_quantize_into:{fmt!r}" in fused._compiled
    assert torch.equal(_bits(out), _bits(y_eager))
    if mask_eager is not None:
        assert torch.equal(clipped, ~mask_eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8da4w_weight_and_activation_compiled_equal_eager(dtype):
    weight_format, activation_format = _formats("8da4w")
    weight_mask = _assert_same(weight_format, _hard_tensor((ROWS, WIDTH), dtype))
    _assert_into_same(weight_format, _hard_tensor((ROWS, WIDTH), dtype))
    _assert_into_same(weight_format, _hard_tensor((2 * ROWS, WIDTH), dtype, seed=4))  # dynamic rows
    assert not weight_mask.all()  # int4 symmetric clips each group's positive maximum (7.5 -> 8 -> 7)
    _assert_same(activation_format, _hard_tensor((2, ROWS // 2, WIDTH), dtype, seed=1))
    # another row count reuses the compiled code (rows are dynamic) and is still exact
    _assert_same(activation_format, _hard_tensor((3, ROWS, WIDTH), dtype, seed=2))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "8da4w"])
def test_every_scheme_compiled_equals_eager(scheme):
    for index, fmt in enumerate(_formats(scheme)):
        _assert_same(fmt, _hard_tensor((ROWS, WIDTH), seed=index))
        _assert_into_same(fmt, _hard_tensor((ROWS, WIDTH), seed=index))


def test_small_tensors_grad_mode_and_switch_stay_eager(monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "_compiled_for",
                        lambda fmt, body=None: calls.append(fmt) or (lambda f, x: f.fake_quantize_with_mask(x)))
    fmt = _formats("8w")[0]
    small = torch.randn(ROWS, WIDTH // 2)  # below FUSE_MIN_NUMEL
    big = torch.randn(ROWS, WIDTH)
    with torch.no_grad():
        fused.fake_quantize_clipped(fmt, small)
    fused.fake_quantize_clipped(fmt, big)  # grad mode on: eager (autograd must see the ops)
    fused.set_fused_fake_quant(False)
    with torch.no_grad():
        fused.fake_quantize_clipped(fmt, big)
    assert calls == []
    fused.set_fused_fake_quant(True)
    with torch.no_grad():
        y, mask = fused.fake_quantize_clipped(fmt, big)
    assert calls == [fmt] and y.shape == big.shape and mask.shape == big.shape


def test_fake_quant_linear_training_step_equal_with_and_without_fusion():
    """Forward values and every gradient (STE masks on weight and activation) are identical."""

    def run(enabled):
        fused.set_fused_fake_quant(enabled)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(WIDTH, 256, bias=True))
        QATQuantizer("8da4w", quantize_output=True).prepare(model)
        x = _hard_tensor((2, ROWS // 2, WIDTH), seed=3).requires_grad_(True)
        with torch.no_grad():
            model[0].weight[5, :32] *= 40.0  # a group whose max clips
        y = model(x)
        y.pow(2).sum().backward()
        return y.detach(), x.grad, model[0].weight.grad, model[0].bias.grad

    eager, fused_run = run(False), run(True)
    for a, b in zip(eager, fused_run):
        assert torch.equal(_bits(a), _bits(b))
    # the STE zeroed the clipped weights' gradient: a nonzero incoming gradient met a zero mask
    assert (fused_run[2] == 0).any() and (fused_run[2] != 0).sum() > fused_run[2].numel() // 2
