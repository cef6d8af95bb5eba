"""FP8 / FP4 / E8M0 / MX / NVFP4 / NF4 vs references built from the format definitions.

Element rounding is checked against grids enumerated from the bit layouts (not torch's casts):
nearest value, ties to the even code, saturation at the largest finite value.
"""

import math

import numpy as np
import pytest
import torch

from qattune.errors import QattuneError
from qattune.quant.formats import NF4, NF4_LEVELS, NVFP4, Float8Rowwise, MXFormat
from qattune.quant.formats.elements import (
    divide,
    divide_by,
    e2m1_decode,
    e2m1_encode,
    e8m0_decode,
    e8m0_encode,
    exp2_int,
    reciprocal,
    round_to_dtype,
    to_e4m3_saturated,
    to_e5m2_saturated,
)


def float_grid(exp_bits, man_bits, bias, skip_top_codes):
    """Non-negative finite values and codes of a float format, from its bit layout."""
    values, codes = [], []
    for code in range(2 ** (exp_bits + man_bits) - skip_top_codes):
        e, m = code >> man_bits, code & (2**man_bits - 1)
        if e == 0:
            value = m / 2**man_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + m / 2**man_bits) * 2.0 ** (e - bias)
        values.append(value)
        codes.append(code)
    return np.array(values), np.array(codes)


E4M3 = float_grid(4, 3, 7, skip_top_codes=1)  # 0x7F is NaN; max 448
E5M2 = float_grid(5, 2, 15, skip_top_codes=4)  # exponent 31 is inf/NaN; max 57344
E2M1 = float_grid(2, 1, 1, skip_top_codes=0)  # 0, .5, 1, 1.5, 2, 3, 4, 6


def round_to_grid(v, grid):
    """Nearest grid value (float64 distances), ties to the even code, saturating; returns (value, code)."""
    values, codes = grid
    v = np.asarray(v, dtype=np.float64).ravel()
    a = np.minimum(np.abs(v), values[-1])
    dist = np.abs(a[:, None] - values[None, :])
    best = dist.min(axis=1, keepdims=True)
    candidates = np.where(dist == best, codes[None, :] % 2, 2)  # even codes first on ties
    idx = np.argmin(candidates, axis=1)
    return np.copysign(values[idx], v), codes[idx]


def test_grids_match_the_spec():
    assert E4M3[0][-1] == 448.0 and E5M2[0][-1] == 57344.0
    assert E2M1[0].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert E4M3[0][1] == 2.0**-9  # smallest subnormal


def _probe_values(maxval):
    torch.manual_seed(0)
    beyond = torch.tensor([maxval * 1.5, -maxval * 9])
    v = torch.cat([torch.randn(3000) * maxval / 3, torch.randn(500) * maxval * 0.01, beyond])
    return v.float()


@pytest.mark.parametrize("fn,grid,maxval", [(to_e4m3_saturated, E4M3, 448.0), (to_e5m2_saturated, E5M2, 57344.0)])
def test_fp8_saturating_casts(fn, grid, maxval):
    v = _probe_values(maxval)
    midpoints = torch.tensor([2.0**-10, 2.0**-10 * 3, 13.0, 464.0])  # ties
    v = torch.cat([v, midpoints, -midpoints])
    ref, _ = round_to_grid(v.numpy(), grid)
    assert torch.equal(fn(v).float(), torch.from_numpy(ref).float())


def test_e2m1_rounding_and_codes():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0])
    v = torch.cat([_probe_values(6.0), ties, -ties, torch.tensor([0.0, -0.0])])
    ref_value, ref_code = round_to_grid(v.numpy(), E2M1)
    ref_code = ref_code + 8 * np.signbit(ref_value)
    codes = e2m1_encode(v)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes.long(), torch.from_numpy(ref_code).long())
    assert torch.equal(e2m1_decode(codes), torch.from_numpy(ref_value).float())
    assert e2m1_encode(ties).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 7]


def test_e8m0_and_exact_powers_of_two():
    e = torch.arange(-149, 128)
    assert torch.equal(exp2_int(e), torch.tensor([math.ldexp(1.0, int(k)) for k in e], dtype=torch.float32))
    codes = e8m0_encode(torch.tensor([-200, -127, 0, 5, 127, 300]))
    assert codes.tolist() == [0, 0, 127, 132, 254, 254]
    assert e8m0_decode(codes).tolist() == [2.0**-127, 2.0**-127, 1.0, 32.0, 2.0**127, 2.0**127]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_dtype_equals_the_cast(dtype):
    torch.manual_seed(0)
    v = torch.cat([torch.randn(20000) * 10.0 ** k for k in range(-9, 6)])
    v = torch.cat([v, torch.tensor([65504.0, 65519.0, 65520.0, -7e4, 0.0, -0.0, 2.0**-24, 2.0**-25, 3e38])])
    assert torch.equal(round_to_dtype(v, dtype), v.to(dtype).float())


def mx_reference(x, emax, grid):
    """OCP MX v1.0 per block of 32 (float64 math; block scaling by a power of two is exact)."""
    rows = x.float().numpy().astype(np.float64).reshape(-1, 32)
    out, exps = np.empty_like(rows), []
    for i, block in enumerate(rows):
        amax = np.abs(block).max()
        shared = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - emax))
        elements, _ = round_to_grid(block / 2.0**shared, grid)
        out[i] = elements * 2.0**shared
        exps.append(shared)
    return torch.from_numpy(out).reshape(x.shape).float(), torch.tensor(exps).reshape(*x.shape[:-1], -1)


def _mx_input(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 128) * torch.logspace(-3, 3, 4)[:, None]
    x[0, :32] = 0.0  # all-zero block
    x[1, 40] = 1e4  # outlier
    x[2, 64:96] = torch.tensor([3.9] + [0.7] * 31)  # amax / 2**e near 2**(emax+1): elements clip
    x[3, 96:] = torch.tensor([4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)  # scale 1 for fp4: ties
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("element,emax,grid", [("fp8_e4m3", 8, E4M3), ("fp4_e2m1", 2, E2M1)])
def test_mx_matches_ocp_definition(dtype, element, emax, grid):
    x = _mx_input(dtype)
    fmt = MXFormat(element)
    ref_hat, ref_exp = mx_reference(x, emax, grid)
    q = fmt.quantize(x)
    assert q.scale.dtype == torch.uint8 and q.scale.shape == (4, 4)
    assert torch.equal(q.scale.long(), ref_exp + 127)
    assert q.scale[0, 0] == 0  # all-zero block: smallest scale
    assert torch.equal(fmt.dequantize(q), ref_hat)
    assert torch.equal(fmt.fake_quantize(x), ref_hat.to(dtype))


def test_mx_fp4_clip_mask():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([7.5, 6.9, -7.0, 3.0])  # amax 7.5 -> scale 2**0; |v| >= 7 is clipped
    _, in_range = MXFormat("fp4_e2m1").fake_quantize_with_mask(x)
    assert in_range[0, :4].tolist() == [False, True, False, True] and bool(in_range[0, 4:].all())


def _nvfp4_reference(x):
    """NVFP4 in float32 numpy arithmetic, e4m3/e2m1 by grid rounding."""
    f32 = np.float32
    blocks = x.float().numpy().reshape(-1, 16)
    amax_t = np.abs(blocks).max()
    s_t = f32(amax_t) / f32(448 * 6) if amax_t > 0 else f32(1)
    s_b = (np.abs(blocks).max(axis=1, keepdims=True) / f32(6)) / s_t
    s_b = np.clip(s_b, f32(2.0**-6), f32(448)).astype(np.float32)
    s_b = round_to_grid(s_b, E4M3)[0].astype(np.float32).reshape(-1, 1)
    total = (s_b * s_t).astype(np.float32)
    v = (blocks / total).astype(np.float32)
    e = round_to_grid(v, E2M1)[0].astype(np.float32).reshape(blocks.shape)
    return torch.from_numpy((e * total).astype(np.float32)).reshape(x.shape), torch.from_numpy(s_b), s_t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_matches_definition(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 64) * torch.logspace(-2, 1, 4)[:, None]
    x[0, :16] = 0.0
    x[1, 5] = 200.0
    x[3, 16:32] = 1e-6  # tiny block: its scale floors at 2**-6
    x = x.to(dtype)
    ref_hat, ref_sb, ref_st = _nvfp4_reference(x)
    fmt = NVFP4()
    q = fmt.quantize(x)
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (4, 4)
    assert q.global_scale.shape == (1,) and q.global_scale.item() == ref_st
    assert torch.equal(q.scale.float().reshape(-1, 1), ref_sb)
    assert torch.equal(fmt.dequantize(q), ref_hat)
    assert torch.equal(fmt.fake_quantize(x), ref_hat.to(dtype))


def test_nvfp4_all_zero_tensor_is_finite():
    q = NVFP4().quantize(torch.zeros(2, 16))
    assert q.global_scale.item() == 1.0 and torch.all(NVFP4().dequantize(q) == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_rowwise_matches_definition(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 64) * 5
    x[0, 0] = 0.0
    x[1, 2, 7] = -3e4
    x = x.to(dtype)
    xf = x.float().numpy()
    scale = (np.maximum(np.abs(xf).max(-1, keepdims=True), np.float32(1e-12)) / np.float32(448)).astype(np.float32)
    elements = round_to_grid((xf / scale).astype(np.float32), E4M3)[0].reshape(xf.shape).astype(np.float32)
    ref = torch.from_numpy(elements * scale)
    fmt = Float8Rowwise()
    q = fmt.quantize(x)
    assert q.codes.dtype == torch.float8_e4m3fn and q.scale.shape == (3, 4, 1)
    assert torch.equal(q.scale, torch.from_numpy(scale))
    assert torch.equal(fmt.dequantize(q), ref)
    assert torch.equal(fmt.fake_quantize(x), ref.to(dtype))
    assert torch.all(fmt.dequantize(q)[0, 0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_nearest_level(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 128)
    x[0, :64] = 0.0
    x[1, 0] = 30.0
    x = x.to(dtype)
    xb = x.float().reshape(-1, 64).double()
    absmax = xb.abs().amax(-1, keepdim=True)
    v = xb / torch.where(absmax > 0, absmax, 1.0)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32).double()
    ref_codes = (v[..., None] - levels).abs().argmin(-1)  # first (lower) level on ties
    fmt = NF4()
    q = fmt.quantize(x)
    assert q.scale.shape == (2, 2) and q.scale.dtype == torch.float32
    assert torch.equal(q.codes.long().reshape(-1, 64), ref_codes)
    ref_hat = (levels.float()[ref_codes] * absmax.float()).reshape(x.shape)
    assert torch.equal(fmt.dequantize(q), ref_hat)
    assert torch.equal(fmt.fake_quantize(x), ref_hat.to(dtype))


def test_nf4_exact_ties_go_to_the_lower_level():
    x = torch.zeros(1, 64)
    x[0, :3] = torch.tensor([1.0, 0.0795803 / 2, -0.0910500 / 2])
    codes = NF4().quantize(x).codes[0, :3].tolist()
    assert codes == [15, 7, 6]


@pytest.mark.parametrize("fmt,width", [(MXFormat("fp8_e4m3"), 48), (NVFP4(), 40), (NF4(), 96)])
def test_block_size_must_divide_width(fmt, width):
    with pytest.raises(QattuneError, match=f"{width} in blocks of {fmt.block_size}"):
        fmt.quantize(torch.randn(2, width))


def test_unknown_mx_element_is_an_error():
    with pytest.raises(QattuneError, match="fp4_e2m1"):
        MXFormat("fp6")


def test_divide_and_reciprocal_are_correctly_rounded_where_the_reciprocal_product_is_not():
    """`divide`/`reciprocal` (used for every scale) equal IEEE float32 division on the CPU, including
    the inputs where multiplying by the rounded reciprocal (what CUDA and Triton do) is one unit off."""
    torch.manual_seed(0)
    t = torch.randn(100_000) * 3
    for divisor in (127.5, 7.5, 15.0, 255.0, 448.0, 2688.0):
        exact = t / torch.tensor(divisor)  # a tensor divisor: the CPU's IEEE division
        assert torch.equal(divide(t, divisor), exact)
        assert (t * (1.0 / divisor) != exact).any()  # the shortcut really differs on some inputs
    s = torch.rand(10_000) + 0.01
    assert torch.equal(reciprocal(s), torch.ones(()) / s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_divide_by_is_exact_in_compiled_cuda_code():
    """Triton's float32 division is approximate; `divide_by` compiled for CUDA still equals the CPU's
    IEEE quotient on every element (what keeps fused FP8 and int codes the same on both devices)."""
    torch.manual_seed(0)
    t, d = torch.randn(1 << 20) * 3, torch.rand(1 << 20) + 0.01
    exact = t / d
    compiled = torch.compile(divide_by)(t.cuda(), d.cuda()).cpu()
    assert torch.equal(compiled, exact)
    assert torch.equal(divide_by(t.cuda(), d.cuda()).cpu(), exact)  # eager CUDA kernels divide exactly
    assert torch.equal(divide_by(t, d), exact)
