"""GGUF Q8_0 / Q4_0: block bytes and dequantized values equal the `gguf` package's (llama.cpp's)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from qattune.errors import QattuneError
from qattune.quant.formats import GGUFQ4_0, GGUFQ8_0


def q8_0_bytes(q):
    """GGUF Q8_0 block layout from a QuantizedTensor: float16 d, then 32 int8 codes."""
    d = q.scale.numpy().astype(np.float16).view(np.uint8).reshape(*q.scale.shape, 2)
    codes = q.codes.numpy().view(np.uint8).reshape(*q.scale.shape, 32)
    return np.concatenate([d, codes], axis=-1).reshape(q.scale.shape[0], -1)


def q4_0_bytes(q):
    """GGUF Q4_0 block layout: float16 d, then byte j = q[j] | q[j + 16] << 4."""
    d = q.scale.numpy().astype(np.float16).view(np.uint8).reshape(*q.scale.shape, 2)
    codes = q.codes.numpy().reshape(*q.scale.shape, 32)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([d, packed], axis=-1).reshape(q.scale.shape[0], -1)


def _gguf_input(dtype):
    torch.manual_seed(0)
    x = torch.randn(6, 128) * torch.logspace(-4, 2, 6)[:, None]
    x[0, :32] = 0.0  # all-zero block
    x[1, 40] = 5e3  # single outlier
    x[2, 32:64] = torch.linspace(-1.0, 1.0, 32)  # +-max tie: first one (-1.0) wins, d = 1/8
    x[3, :32] = torch.tensor([2.0, -2.0] + [0.5] * 30)  # tie: +2 first -> d = -0.25, -2 -> q = 16 -> 15
    x[4, 64:96] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.5] + [0.0] * 26)  # Q8_0: d = 1, halves away
    x[5, :32] = 1e7  # d = 1e7 / 127 is beyond float16's range: inf, as in llama.cpp
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "fmt,qtype,to_bytes",
    [(GGUFQ8_0(), GGMLQuantizationType.Q8_0, q8_0_bytes), (GGUFQ4_0(), GGMLQuantizationType.Q4_0, q4_0_bytes)],
)
def test_blocks_equal_gguf_package(dtype, fmt, qtype, to_bytes):
    x = _gguf_input(dtype)
    if qtype == GGMLQuantizationType.Q4_0:
        x = x[:5]  # Q4_0's d = max / -8 stays finite
    x32 = x.float().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        ref_bytes = quants.quantize(x32, qtype)
        ref_values = quants.dequantize(ref_bytes, qtype)
    q = fmt.quantize(x)
    assert q.scale.dtype == torch.float16 and q.scale.shape == (x.shape[0], 4)
    np.testing.assert_array_equal(to_bytes(q), ref_bytes)
    ours = fmt.dequantize(q)
    np.testing.assert_array_equal(ours.numpy(), ref_values)  # (NaN == NaN here)
    np.testing.assert_array_equal(fmt.fake_quantize(x).float().numpy(), ours.to(dtype).float().numpy())


def test_q8_0_rounds_half_away_from_zero():
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.5])
    q = GGUFQ8_0().quantize(x)
    assert q.scale.item() == 1.0
    assert q.codes[0, :6].tolist() == [127, 3, -3, 1, -1, 2]


def test_q4_0_signed_max_ties_and_clip_mask():
    x = torch.full((1, 32), 0.5)
    x[0, :2] = torch.tensor([2.0, -2.0])  # first of the tied maxima is +2: d = -0.25
    fmt = GGUFQ4_0()
    q = fmt.quantize(x)
    assert q.scale.item() == -0.25
    # 2 / -0.25 + 8.5 = 0.5 -> 0; -2 -> 16.5 -> 16 -> 15 (clipped); 0.5 -> 6.5 -> 6
    assert q.codes[0, :3].tolist() == [0, 15, 6]
    x_hat, in_range = fmt.fake_quantize_with_mask(x)
    assert x_hat[0, :3].tolist() == [2.0, -1.75, 0.5]
    assert in_range[0].tolist() == [True, False] + [True] * 30


def test_q4_0_all_zero_block_uses_code_8():
    q = GGUFQ4_0().quantize(torch.zeros(2, 32))
    assert torch.all(q.codes == 8) and torch.all(q.scale == 0)
    assert torch.all(GGUFQ4_0().dequantize(q) == 0)


@pytest.mark.parametrize("fmt, qtype", [(GGUFQ8_0, GGMLQuantizationType.Q8_0), (GGUFQ4_0, GGMLQuantizationType.Q4_0)])
def test_blocks_too_small_for_a_float16_scale_decode_to_zero_not_nan(fmt, qtype):
    """1 / d overflows below ~4e-37: fake quantization gave inf * 0 = NaN where llama.cpp decodes 0."""
    x = torch.full((3, 32), 1e-39)
    x[1, ::2] = 0.0  # zeros beside tiny values: 0 * inf was NaN too
    x[2] = torch.linspace(-3e-38, 3e-38, 32)
    fake, _ = fmt().fake_quantize_with_mask(x)
    reference = quants.dequantize(quants.quantize(x.numpy(), qtype), qtype)
    assert torch.equal(fake, torch.zeros_like(x)) and np.array_equal(reference, np.zeros((3, 32), np.float32))
    assert torch.equal(fmt().dequantize(fmt().quantize(x)), fake)


def test_quantizes_along_rows_of_any_rank():
    x = torch.randn(2, 3, 64)
    q = GGUFQ4_0().quantize(x)
    assert q.codes.shape == (2, 3, 64) and q.scale.shape == (2, 3, 2)
    q4_0 = GGMLQuantizationType.Q4_0
    ref = quants.dequantize(quants.quantize(x.reshape(6, 64).numpy(), q4_0), q4_0)
    assert torch.equal(GGUFQ4_0().dequantize(q).reshape(6, 64), torch.from_numpy(ref))


def test_width_must_be_a_multiple_of_32():
    with pytest.raises(QattuneError, match="100 in blocks of 32"):
        GGUFQ8_0().quantize(torch.randn(1, 100))


def test_q4_0_sum_rounding_boundaries_match_gguf():
    # d = 8 / -8 = -1, so t = x * (1/d) = -x exactly; put t on each half-integer boundary of
    # trunc(t + 8.5) and one float32 step below it, where the float32 sum t + 8.5 rounds up.
    halves = np.arange(-7.5, 8.0, 1.0, dtype=np.float32)
    below = np.nextafter(halves, np.float32(-np.inf), dtype=np.float32)
    t = np.concatenate([halves, below[:15]])
    x = torch.from_numpy(np.concatenate([[np.float32(8.0)], -t]).astype(np.float32)).reshape(1, 32)
    ref = quants.quantize(x.numpy(), GGMLQuantizationType.Q4_0)
    q = GGUFQ4_0().quantize(x)
    assert q.scale.item() == -1.0
    np.testing.assert_array_equal(q4_0_bytes(q), ref)
    # the float32 sum rounds: t = -0.5 - 2**-24 still gives trunc(8.0) = 8 (exact arithmetic: 7)
    assert q.codes[0, 1 + 16 + 7].item() == 8


def test_trunc_plus_8_5_equals_float32_sum_then_trunc():
    from qattune.quant.formats.gguf_blocks import trunc_plus_8_5

    halves = np.arange(-8.5, 8.5, 0.5, dtype=np.float32)
    near = [np.nextafter(halves, np.float32(direction), dtype=np.float32) for direction in (-np.inf, np.inf)]
    steps_below = [halves - np.float32(k * 2.0**-24) for k in range(1, 9)]
    rng = np.random.default_rng(0)
    t = np.concatenate([halves, *near, *steps_below, rng.uniform(-8, 8, 20000).astype(np.float32)])
    t = t[(t >= -8.5) & (t < 8.5)].astype(np.float32)
    expected = np.trunc(t + np.float32(8.5))  # numpy: float32 sum, then trunc
    assert np.array_equal(trunc_plus_8_5(torch.from_numpy(t)).numpy(), expected)


def test_q4_0_grid_at_q4_0s_own_scale_is_q4_0_up_to_its_float16_encoding():
    """The fixed-scale grid that range learning and GPTQ use for Q4_0: at Q4_0's own `d` it stores
    Q4_0's scales and, but for the encoding with float16 `d` and ties to even, its codes."""
    from qattune.quant.formats.gguf_blocks import Q4_0Grid

    grid, q4_0 = Q4_0Grid(), GGUFQ4_0()
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    d, zero = grid.choose_qparams(x)
    assert d.shape == (256, 16) and torch.equal(zero, torch.full_like(d, 8.0))
    ours, reference = grid.quantize_with_qparams(x, d, zero), q4_0.quantize(x)
    assert ours.codes.dtype == torch.uint8 and ours.zero is None
    assert torch.equal(ours.scale, reference.scale)  # float16 d = m / -8, negative where m > 0
    moved = ours.codes.int() - reference.codes.int()
    assert 0 < int(moved.ne(0).sum()) < 1e-3 * x.numel() and int(moved.abs().max()) == 1
    # fake quantization is what a Q4_0 reader makes of the stored codes and scales, bit for bit
    fake, _ = grid.fake_quantize_with_qparams(x, d, zero)
    assert torch.equal(fake, q4_0.dequantize(ours))


def test_q4_0_grid_cover_takes_the_sign_with_the_smaller_step_and_clips_nothing():
    from qattune.quant.formats.gguf_blocks import Q4_0Grid

    grid = Q4_0Grid()
    x = torch.zeros(1, 96)
    x[0, :32] = torch.linspace(-1.0, 0.7, 32)  # negative extreme: d > 0, -8 d = -1 (0.7 / 7 = 0.1 < 1 / 8)
    x[0, 32:64] = torch.linspace(-0.7, 1.0, 32)  # positive extreme: d < 0, -8 d = 1
    x[0, 64:] = torch.linspace(-0.7, 0.75, 32)  # 0.75 / 7 > 0.7 / 8 but 0.75 / 8 < 0.7 / 7: d = -0.1
    d, zero = grid.covering_qparams(x)
    torch.testing.assert_close(d, torch.tensor([[0.125, -0.125, -0.1]]))
    fake, in_range = grid.fake_quantize_with_qparams(x, d, zero)
    assert bool(in_range.all())
    assert float((fake - x).abs().max()) <= 0.5 * 0.125 + 1e-3
    # an all-zero block keeps a scale float16 can store, and quantizes to zeros
    d0, z0 = grid.covering_qparams(torch.zeros(1, 32))
    assert float(grid.grid_scale(d0)) == 2.0**-24
    assert torch.equal(grid.fake_quantize_with_qparams(torch.zeros(1, 32), d0, z0)[0], torch.zeros(1, 32))
