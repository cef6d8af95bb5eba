"""Integer formats vs references written from their definitions (torchao conventions, int4 tinygemm)."""

import numpy as np
import pytest
import torch

from qattune.errors import QattuneError
from qattune.quant.formats import Int4Tinygemm, IntAffine


def torchao_affine_reference(x, bits, symmetric, group, signed=True):
    """torchao `_choose_qparams_affine` + `_fake_quantize_affine`, done in the input dtype as torchao does."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    xb = x.reshape(*x.shape[:-1], -1, group)
    zeros = torch.zeros((), dtype=x.dtype)
    lo = torch.minimum(xb.amin(-1, keepdim=True), zeros)
    hi = torch.maximum(xb.amax(-1, keepdim=True), zeros)
    eps = torch.finfo(x.dtype).eps
    if symmetric:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=eps)
        zero = torch.full_like(scale, int((qmax + qmin + 1) / 2))
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    scale, zero = scale.float(), zero.float()
    q = torch.clamp(torch.round(xb.float() * (1.0 / scale)) + zero, qmin, qmax)
    x_hat = ((q - zero) * scale).reshape(x.shape).to(x.dtype)
    return x_hat, q.reshape(x.shape), scale[..., 0], zero[..., 0]


def _edge_weight(dtype):
    torch.manual_seed(0)
    w = torch.randn(6, 64) * torch.rand(6, 1) * 0.2
    w[0, :32] = 0.0  # all-zero group
    w[1, 3] = 40.0  # single outlier
    w[2, :32] = -torch.rand(32)  # all-negative group
    w[3, 32:] = torch.rand(32) + 1.0  # all-positive group
    w[4, 0] = 7.5  # max maps to 7.5 * (1/scale) -> rounds to 8 -> clipped to 7
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "bits,symmetric,group,signed",
    [
        (4, True, 32, True),
        (8, False, 32, True),
        (8, True, 64, True),
        (4, False, 32, False),
        (4, True, 16, False),
        (2, True, 32, True),
    ],
)
def test_int_affine_matches_torchao_formulas(dtype, bits, symmetric, group, signed):
    w = _edge_weight(dtype)
    fmt = IntAffine(bits, symmetric, group, signed=signed)
    ref_hat, ref_q, ref_scale, ref_zero = torchao_affine_reference(w, bits, symmetric, group, signed)
    q = fmt.quantize(w)
    assert q.codes.dtype == (torch.int8 if signed else torch.uint8)
    assert q.codes.shape == w.shape and q.scale.shape == (6, 64 // group) and q.scale.dtype == torch.float32
    assert torch.equal(q.codes.float(), ref_q)
    assert torch.equal(q.scale, ref_scale)
    if q.zero is None:
        assert torch.all(ref_zero == 0)
    else:
        assert torch.equal(q.zero.float(), ref_zero)
    assert torch.equal(fmt.dequantize(q, dtype), ref_hat)
    assert torch.equal(fmt.fake_quantize(w), ref_hat)


def test_int4_symmetric_hand_example():
    x = torch.tensor([[0.0, 1.0, -2.0, 7.5], [0.0, 0.0, 0.0, 0.0]])
    fmt = IntAffine(4, True, None)
    q = fmt.quantize(x)
    assert q.scale.tolist() == [[1.0], [torch.finfo(torch.float32).eps]]  # 7.5 / 7.5; all-zero -> eps
    assert q.zero is None
    assert q.codes.tolist() == [[0, 1, -2, 7], [0, 0, 0, 0]]  # round(7.5) = 8 (half to even) -> 7
    assert fmt.dequantize(q).tolist() == [[0.0, 1.0, -2.0, 7.0], [0.0, 0.0, 0.0, 0.0]]


def test_int8_asymmetric_per_token_hand_example():
    x = torch.tensor([[-255 / 256, -128.5 / 256, -127.5 / 256, 0.0], [0.0, 0.0, 0.0, 0.0]])
    fmt = IntAffine(8, False, None)
    q = fmt.quantize(x)
    # row 0: lo = -255/256, hi = 0 -> scale = 1/256, zp = -128 - round(-255) = 127;
    # -128.5 and -127.5 both round half to even to -128. Row 1 (all zero): scale = eps, zp = -128.
    assert q.scale.tolist() == [[1 / 256], [torch.finfo(torch.float32).eps]]
    assert q.zero.tolist() == [[127], [-128]]
    assert q.codes.tolist() == [[-128, -1, -1, 127], [-128, -128, -128, -128]]
    assert fmt.dequantize(q).tolist() == [[-255 / 256, -0.5, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_fixed_qparams_clip_and_report_the_clipped_elements():
    fmt = IntAffine(4, False, None, signed=False)  # codes 0..15
    x = torch.tensor([[-2.0, 0.2, 1.0, 8.0]])
    scale, zero = torch.tensor([[0.5]]), torch.tensor([[3.0]])
    # x / 0.5 = -4, 0.4, 2, 16 -> rounded + 3 = -1, 3, 5, 19 -> clamped to 0, 3, 5, 15
    q = fmt.quantize_with_qparams(x, scale, zero)
    assert q.codes.tolist() == [[0, 3, 5, 15]] and q.codes.dtype == torch.uint8
    x_hat, in_range = fmt.fake_quantize_with_qparams(x, scale, zero)
    assert x_hat.tolist() == [[-1.5, 0.0, 1.0, 6.0]]
    assert in_range.tolist() == [[False, True, True, False]]


def test_per_tensor_scale():
    x = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
    q = IntAffine(8, True, None, per_tensor=True).quantize(x)
    assert q.scale.shape == (1,)
    assert q.scale.item() == pytest.approx(3.0 / 127.5, rel=1e-7)


def test_bf16_scale_is_rounded_in_bf16_like_torchao():
    x = torch.tensor([[1.0, 0.3]], dtype=torch.bfloat16)
    q = IntAffine(4, True, None).quantize(x)
    assert q.scale.item() == torch.tensor(1.0 / 7.5).to(torch.bfloat16).item() != pytest.approx(1.0 / 7.5, abs=1e-7)


def test_explicit_eps_floors_the_scale():
    q = IntAffine(8, True, None, eps=1e-3).quantize(torch.tensor([[1e-5, 0.0]]))
    assert q.scale.item() == pytest.approx(1e-3)


def test_group_that_does_not_divide_width_is_a_clear_error():
    with pytest.raises(QattuneError, match=r"last dimension is 48 in blocks of 32"):
        IntAffine(4, True, 32).quantize(torch.randn(2, 48))
    with pytest.raises(QattuneError, match="48.*32"):
        IntAffine(4, True, 32).check_width(48)


def test_invalid_constructor_arguments():
    with pytest.raises(QattuneError, match="bits"):
        IntAffine(9, True, None)
    with pytest.raises(QattuneError, match="group_size"):
        IntAffine(4, True, 0)


def tinygemm_reference(w, group):
    """NUMERICS.md `4w`: float32 scale/min, round half even, bf16 scale and zero for dequantization."""
    x = w.float().numpy().reshape(w.shape[0], -1, group)
    lo = x.min(-1, keepdims=True)
    hi = x.max(-1, keepdims=True)
    scale = np.maximum(hi - lo, np.float32(1e-6)) / np.float32(15)
    q = np.clip(np.round((x - lo) / scale), 0, 15)
    scale_bf16 = torch.from_numpy(scale).to(torch.bfloat16)
    zero_bf16 = torch.from_numpy(lo + np.float32(8) * scale).to(torch.bfloat16)
    x_hat = (torch.from_numpy(q) - 8) * scale_bf16.float() + zero_bf16.float()
    return torch.from_numpy(q).reshape(w.shape), scale_bf16[..., 0], zero_bf16[..., 0], x_hat.reshape(w.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_tinygemm_matches_reference(dtype):
    w = _edge_weight(dtype)
    w[5, :32] = 3.0  # constant group: the range floors at 1e-6
    fmt = Int4Tinygemm(group_size=32)
    ref_q, ref_scale, ref_zero, ref_hat = tinygemm_reference(w, 32)
    q = fmt.quantize(w)
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == torch.bfloat16 and q.zero.dtype == torch.bfloat16
    assert torch.equal(q.codes.float(), ref_q)
    assert torch.equal(q.scale, ref_scale) and torch.equal(q.zero, ref_zero)
    assert torch.equal(fmt.dequantize(q, dtype), ref_hat.to(dtype))
    assert torch.equal(fmt.fake_quantize(w), ref_hat.to(dtype))
    assert q.codes.min() == 0 and q.codes.max() == 15
