"""Element encodings shared by the float formats: FP8 E4M3/E5M2, FP4 E2M1 and E8M0 scales.

All helpers are pure tensor code (no Python loops, no data-dependent control flow) so they run
unchanged on any device and under `torch.compile`. Inputs are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
E5M2_MAX = 57344.0  # torch.finfo(torch.float8_e5m2).max
E2M1_MAX = 6.0
E4M3_MIN_NORMAL = 2.0**-6  # torch.finfo(torch.float8_e4m3fn).tiny

# Midpoint above the largest finite value: a value strictly below it rounds to a finite value
# without saturation, so the straight-through estimator treats it as in range.
E4M3_CLIP_THRESHOLD = 464.0  # 448 + 32 / 2
E2M1_CLIP_THRESHOLD = 7.0  # 6 + 2 / 2

_CONSTANT_CACHE: dict[tuple[tuple[float, ...], torch.device, torch.dtype], Tensor] = {}


def constant_tensor(values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A lookup table on `device`, built once per device in eager mode (a graph constant when compiling)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, torch.device(device), dtype)
    table = _CONSTANT_CACHE.get(key)
    if table is None:
        table = _CONSTANT_CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return table


E8M0_BIAS = 127
E8M0_MIN_EXP = -127  # biased code 0; code 255 is NaN


def to_e4m3_saturated(v: Tensor) -> Tensor:
    """Round float32 `v` to FP8 E4M3 (round to nearest even), clamping to +-448 first."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def to_e5m2_saturated(v: Tensor) -> Tensor:
    """Round float32 `v` to FP8 E5M2 (round to nearest even), clamping to +-57344 first."""
    return v.clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2)


def divide(t: Tensor, divisor: float) -> Tensor:
    """`t / divisor`, correctly rounded to `t`'s dtype on every device and under `torch.compile`.

    PyTorch's CUDA kernels and Inductor's generated code turn a division by a constant into a
    multiplication by its rounded reciprocal, one unit in the last place off for about a third of
    inputs. A scale that far off moves values lying exactly on a rounding tie (the negative absmax
    element of a symmetric int row sits at -7.5 or -127.5), so CPU, CUDA and compiled code would pick
    different codes for some weights. Dividing in float64 and rounding once to float32 gives the
    correctly rounded float32 quotient (53 >= 2 * 24 + 2 bits). Where a compiler still uses the
    reciprocal in float64, the float64 quotient is off by at most one float64 unit, which changes the
    float32 result only for quotients that close to a float32 rounding boundary (about 1 in 2**28).
    """
    return (t.double() / divisor).to(t.dtype)


def divide_by(t: Tensor, divisor: Tensor) -> Tensor:
    """`t / divisor` for a float32 tensor divisor, correctly rounded on every device. A CPU divides
    exactly as IEEE asks, eager and compiled; Triton's float32 division is approximate (up to two units
    off), which moves a value near a rounding boundary of its format (an FP8 or int code) to the
    neighbouring code. So compiled code for other devices divides in float64 and rounds once (see
    `divide`)."""
    if t.device.type == "cpu" or not torch.compiler.is_compiling():  # eager GPU kernels divide exactly
        return t / divisor
    return (t.double() / divisor.double()).to(t.dtype)


def reciprocal(t: Tensor) -> Tensor:
    """`1 / t`, correctly rounded to `t`'s dtype everywhere (see `divide`: Triton's float32 division is
    approximate, so a compiled `1.0 / scale` can land one unit off and move values that sit on a tie)."""
    return (1.0 / t.double()).to(t.dtype)


def floor_log2(v: Tensor) -> Tensor:
    """floor(log2(|v|)) of float32 `v` as int32, read from the exponent bits (-127 for zero/subnormal)."""
    bits = v.float().view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127


def exp2_int(e: Tensor) -> Tensor:
    """Exactly 2**e as float32 for integer `e` in [-149, 127] (built from bits; no exp2 approximation)."""
    e = e.to(torch.int32)
    normal = ((e + 127).clamp(min=1) << 23).view(torch.float32)
    subnormal = (1 << (e + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(e <= -127, subnormal, normal)


def _round_to_bfloat16(t: Tensor) -> Tensor:
    """float32 -> nearest-even bfloat16 value, kept in float32, by integer arithmetic on the bits."""
    bits = t.view(torch.int32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return rounded.view(torch.float32)


def _round_to_precision(t: Tensor, mantissa_bits: int, min_exponent: int, max_finite: float) -> Tensor:
    """float32 -> nearest-even value of a binary float format (overflow -> inf), kept in float32."""
    exponent = floor_log2(t).clamp(min=min_exponent)
    step = exp2_int(exponent - mantissa_bits)
    rounded = torch.round(t / step) * step
    return torch.where(rounded.abs() > max_finite, torch.copysign(torch.full_like(t, float("inf")), t), rounded)


def round_to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float32 `t` to the values of `dtype`, returned as float32 (a no-op for float32).

    Equal to `t.to(dtype).float()`, but written as arithmetic that `torch.compile` keeps: Inductor
    drops float32 -> bf16/fp16 -> float32 round trips inside fused kernels, which would silently
    change the numerics of compiled fake quantization.
    """
    if dtype == torch.float32:
        return t
    if dtype == torch.bfloat16:
        return _round_to_bfloat16(t)
    if dtype == torch.float16:
        return _round_to_precision(t, mantissa_bits=10, min_exponent=-14, max_finite=65504.0)
    return t.to(dtype).float()


def e2m1_round(v: Tensor) -> Tensor:
    """Round float32 `v` to the FP4 E2M1 grid (+-{0, .5, 1, 1.5, 2, 3, 4, 6}), nearest even, saturating."""
    a = v.abs().clamp(max=E2M1_MAX)
    # Grid spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; round-half-even on the scaled value
    # lands ties on the even code, as the OCP spec requires.
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, v)


def e2m1_encode(v: Tensor) -> Tensor:
    """FP4 E2M1 codes (uint8 0..15: sign bit 3, magnitude index bits 0-2) of float32 `v`."""
    r = e2m1_round(v)
    a = r.abs()
    index = torch.where(a < 2.0, a * 2.0, torch.where(a < 4.0, a + 2.0, a * 0.5 + 4.0))
    sign = torch.signbit(r).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e2m1_decode(codes: Tensor) -> Tensor:
    """Float32 values of FP4 E2M1 codes (uint8 0..15)."""
    return constant_tensor(_E2M1_VALUES, codes.device)[codes.long()]


def e8m0_encode(exponent: Tensor) -> Tensor:
    """E8M0 biased exponent (uint8) of an integer exponent, clamped to the finite range [-127, 127]."""
    return (exponent.clamp(E8M0_MIN_EXP, 127) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(code: Tensor) -> Tensor:
    """Float32 power of two of a uint8 E8M0 code."""
    return exp2_int(code.to(torch.int32) - E8M0_BIAS)
