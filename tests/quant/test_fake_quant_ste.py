"""Fake quantization: forward == dequantize(quantize(x)) bit-exactly; straight-through gradients."""

import pytest
import torch

from qattune.quant.fake_quant import fake_quantize_with_qparams
from qattune.quant.formats import (
    NF4,
    NVFP4,
    Float8Rowwise,
    GGUFQ4_0,
    GGUFQ8_0,
    Int4Tinygemm,
    IntAffine,
    MXFormat,
)

ALL_FORMATS = [
    IntAffine(4, True, 32),
    IntAffine(8, False, None),
    IntAffine(8, True, None),
    IntAffine(4, False, 32, signed=False),
    IntAffine(8, True, None, per_tensor=True),
    Int4Tinygemm(64),
    Float8Rowwise(),
    MXFormat("fp8_e4m3"),
    MXFormat("fp4_e2m1"),
    NVFP4(),
    GGUFQ8_0(),
    GGUFQ4_0(),
    NF4(),
]


def _input(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 128) * torch.logspace(-3, 2, 4)[:, None]
    x[0, 0, :64] = 0.0
    x[1, 2, 5] = 1e3
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_fake_quantize_equals_dequantize_of_quantize(fmt, dtype):
    x = _input(dtype)
    expected = fmt.dequantize(fmt.quantize(x), dtype)
    fake = fmt.fake_quantize(x)
    assert fake.dtype == dtype and fake.shape == x.shape
    assert torch.equal(fake, expected)
    assert not torch.equal(fake, x)  # it did quantize


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_empty_and_non_contiguous_inputs(fmt):
    empty = torch.zeros(0, 128, requires_grad=True)
    fmt.fake_quantize(empty).sum().backward()
    assert fmt.dequantize(fmt.quantize(empty.detach())).shape == (0, 128)
    wide = torch.randn(128, 128).t()
    assert not wide.is_contiguous()
    assert torch.equal(fmt.fake_quantize(wide), fmt.fake_quantize(wide.contiguous()))


def test_int_gradient_is_one_in_range_and_zero_where_clipped():
    # per row int4 symmetric: scale = 7.5 / 7.5 = 1; 7.5 rounds (half to even) to 8 and clips to 7
    x = torch.tensor([[0.0, 1.0, -2.0, 7.5, -7.5, 3.4]], requires_grad=True)
    y = IntAffine(4, True, None).fake_quantize(x)
    assert y.tolist() == [[0.0, 1.0, -2.0, 7.0, -8.0, 3.0]]
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    y.backward(upstream)
    assert x.grad.tolist() == [[1.0, 2.0, 3.0, 0.0, 5.0, 6.0]]


def test_q4_0_gradient_zero_for_the_clipped_opposite_extreme():
    x = torch.full((1, 32), 0.25)
    x[0, 0], x[0, 1] = 4.0, -4.0  # d = -0.5: -4 -> trunc(16.5) = 16 -> clipped to 15
    x.requires_grad_(True)
    GGUFQ4_0().fake_quantize(x).sum().backward()
    assert x.grad[0].tolist() == [1.0, 0.0] + [1.0] * 30


def test_mx_gradient_zero_beyond_the_element_range():
    x = torch.zeros(2, 32)
    x[0, :3] = torch.tensor([7.9, 1.0, -7.2])  # scale 2**0 (mxfp4): 7.9 and -7.2 clip to +-6
    x[1, :3] = torch.tensor([511.0, 1.0, 463.0])  # scale 2**0 (mxfp8): 511 clips, 463 rounds to 448
    for row, fmt in ((0, MXFormat("fp4_e2m1")), (1, MXFormat("fp8_e4m3"))):
        xr = x[row : row + 1].clone().requires_grad_(True)
        fmt.fake_quantize(xr).sum().backward()
        expected = [0.0, 1.0, 0.0] if row == 0 else [0.0, 1.0, 1.0]
        assert xr.grad[0, :3].tolist() == expected and bool((xr.grad[0, 3:] == 1).all())


@pytest.mark.parametrize("fmt", [Float8Rowwise(), NVFP4(), GGUFQ8_0(), NF4(), Int4Tinygemm(64)], ids=lambda f: f.name)
def test_formats_that_never_clip_pass_the_gradient_everywhere(fmt):
    x = _input(torch.float32).requires_grad_(True)
    upstream = torch.randn_like(x)
    fmt.fake_quantize(x).backward(upstream)
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_gradient_is_the_mask_and_keeps_the_dtype(fmt):
    x = _input(torch.bfloat16).requires_grad_(True)
    _, in_range = fmt.fake_quantize_with_mask(x.detach())
    upstream = torch.randn_like(x)
    fmt.fake_quantize(x).backward(upstream)
    assert x.grad.dtype == torch.bfloat16
    expected = upstream if in_range is None else upstream * in_range
    assert torch.equal(x.grad, expected)


def test_only_a_boolean_mask_is_saved_for_backward():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = _input(torch.bfloat16).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        IntAffine(4, True, 32).fake_quantize(x)
        GGUFQ8_0().fake_quantize(x)
    assert [t.dtype for t in saved] == [torch.bool]
    assert saved[0].shape == x.shape


def test_no_mask_is_kept_where_nothing_clipped():
    """int8 per-token activations map each token's extremes onto the end codes: nothing clips, so the
    STE keeps no mask and the gradient passes unchanged; a tensor that does clip keeps its mask."""
    per_token = IntAffine(8, False, None)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = (torch.randn(64, 256) * 3).requires_grad_(True)
    assert bool(per_token.fake_quantize_with_mask(x.detach())[1].all())  # nothing clipped
    upstream = torch.randn_like(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = per_token.fake_quantize(x)
    assert saved == []
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        IntAffine(4, True, None).fake_quantize(torch.tensor([[7.5, 1.0]], requires_grad=True))  # 7.5 clips
    assert [t.dtype for t in saved] == [torch.bool]


def test_fixed_qparams_ste():
    fmt = IntAffine(8, True, None)
    x = torch.tensor([[0.5, 2.0, -3.0]], requires_grad=True)
    y = fake_quantize_with_qparams(x, fmt, torch.tensor([[1 / 64]]))
    assert y.tolist() == [[0.5, 127 / 64, -2.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("fmt", [IntAffine(4, True, 32), MXFormat("fp4_e2m1"), GGUFQ4_0()], ids=lambda f: f.name)
def test_traces_into_one_graph(fmt):
    torch._dynamo.reset()
    compiled = torch.compile(fmt.fake_quantize, backend="aot_eager", fullgraph=True)
    x = _input(torch.bfloat16).requires_grad_(True)
    y = compiled(x)
    y.float().sum().backward()
    assert torch.equal(y, fmt.fake_quantize(x.detach()))


@pytest.mark.slow
def test_inductor_keeps_the_numerics():
    """Inductor drops bf16/fp16 round trips inside fused kernels; the formats must not rely on them."""
    formats = [IntAffine(4, True, 32), IntAffine(8, False, None), Int4Tinygemm(64), GGUFQ4_0(), GGUFQ8_0()]

    def all_formats(x):
        return [fmt.fake_quantize(x) for fmt in formats]

    torch._dynamo.reset()
    compiled = torch.compile(all_formats, fullgraph=True)
    x = _input(torch.bfloat16)
    for got, fmt in zip(compiled(x), formats):
        assert torch.equal(got, fmt.dequantize(fmt.quantize(x), torch.bfloat16)), fmt.name


def test_in_place_gradient_zeroing_is_only_for_module_internal_use():
    """By default a caller's gradient is left alone; grad_in_place (what the modules use, whose outputs
    only feed their own matmul) zeroes the clipped elements of autograd's own gradient, same numbers."""
    from qattune.quant.fake_quant import fake_quantize_ste

    fmt = IntAffine(bits=4, symmetric=True, group_size=32)
    x = (torch.randn(64, 512) * 3).requires_grad_(True)
    _, in_range = fmt.fake_quantize_with_mask(x.detach())
    assert not in_range.all()
    upstream = torch.randn_like(x)
    kept = upstream.clone()
    fake_quantize_ste(x, fmt).backward(upstream)
    assert torch.equal(upstream, kept) and torch.equal(x.grad, upstream * in_range)
    x.grad = None
    weight = torch.randn(512, 8)
    (fake_quantize_ste(x, fmt, grad_in_place=True) @ weight).backward(upstream @ weight)
    expected = ((upstream @ weight) @ weight.t()) * in_range
    assert torch.equal(x.grad, expected)
