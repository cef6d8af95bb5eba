"""GGUF Q8_0 and Q4_0 (blocks of 32), bit-exact with `gguf/quants.py` and llama.cpp's `ggml-quants.c`.

Both quantize with the float32 block scale `d` and dequantize with `float16(d)`, as llama.cpp does;
`QuantizedTensor.scale` holds that float16 `d`. Codes are unpacked: int8 for Q8_0, uint8 0..15 for
Q4_0 (GGUF's own byte layout, q[j] | q[j+16] << 4, is the exporter's business).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Optional

import torch
from torch import Tensor

from qattune.quant.formats.base import NumericFormat, QuantizedTensor, to_blocks
from qattune.quant.formats.elements import divide, exp2_int, floor_log2, reciprocal, round_to_dtype
from qattune.quant.formats.int_affine import IntAffine

GGUF_BLOCK_SIZE = 32


def trunc_plus_8_5(t: Tensor) -> Tensor:
    """`trunc(float32(t + 8.5))` for float32 `t` in [-8.5, 8.5), written without adding to `t`.

    llama.cpp rounds the product `x * id` and then the sum `+ 8.5` separately; a compiler that fuses
    `x * id + 8.5` into one FMA (Triton does by default) skips the first rounding. Here `t` only meets
    floor and a comparison: with `f = floor(t)` the answer is `f + 8`, plus 1 when `t + 8.5` rounds to
    `f + 9`, i.e. when `t >= f + 0.5 - h`, `h` half the float32 spacing just below `f + 9` (a tie
    rounds to the even `f + 9`). Every step is exact in float32.
    """
    f = torch.floor(t)
    half_ulp_below = exp2_int(floor_log2(f + 8.5) - 24)
    return f + 8.0 + (t >= (f + 0.5) - half_ulp_below).to(t.dtype)


def _reciprocal_or_zero(d: Tensor) -> Tensor:
    """1 / d, and 0 where d == 0 (llama.cpp's `id = d ? 1.0f/d : 0.0f`) or where 1 / d overflows (a block
    of magnitudes below ~4e-37, whose float16 d is 0 anyway: its values decode to 0, not to inf * 0)."""
    inverse = reciprocal(d)
    return torch.where(torch.isfinite(inverse), inverse, torch.zeros_like(inverse))


def round_half_away(v: Tensor) -> Tensor:
    """C `roundf`: round half away from zero, computed as gguf's `np_roundf` (no `|v| + 0.5` rounding)."""
    a = v.abs()
    floored = torch.floor(a)
    return torch.copysign(floored + torch.floor(2.0 * (a - floored)), v)


class _GGUFBlockFormat(NumericFormat):
    block_size = GGUF_BLOCK_SIZE

    @abstractmethod
    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Float codes, float32 d and the not-clipped mask, in blocked layout."""

    @abstractmethod
    def _decode(self, qb: Tensor, d16: Tensor) -> Tensor:
        """Blocked values from codes and float16 scales."""

    def quantize(self, x: Tensor) -> QuantizedTensor:
        qb, d, _ = self._encode(x)
        codes = qb.to(self.codes_dtype).reshape(x.shape)
        return QuantizedTensor(codes=codes, scale=d[..., 0].to(torch.float16))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        qb = to_blocks(q.codes, self.block_size).float()
        return self._decode(qb, q.scale.unsqueeze(-1)).reshape(q.codes.shape).to(dtype)

    def fake_quantize_with_mask(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        qb, d, in_range = self._encode(x)
        xq = self._decode(qb, round_to_dtype(d, torch.float16)).reshape(x.shape).to(x.dtype)
        return xq, None if in_range is None else in_range.reshape(x.shape)


class GGUFQ8_0(_GGUFBlockFormat):
    """Q8_0: `d = amax / 127`, `q = roundf(x * (1/d))` as int8, `x_hat = q * float16(d)`."""

    name = "q8_0"
    bits = 8
    codes_dtype = torch.int8

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        xb = to_blocks(x, self.block_size).float()
        d = divide(xb.abs().amax(dim=-1, keepdim=True), 127.0)
        # |x * (1/d)| <= 127 up to one rounding: nothing is ever clipped.
        return round_half_away(xb * _reciprocal_or_zero(d)), d, None

    def _decode(self, qb: Tensor, d16: Tensor) -> Tensor:
        return qb * d16.float()


class GGUFQ4_0(_GGUFBlockFormat):
    """Q4_0: `m` = signed value of largest magnitude (first on ties), `d = m / -8`,
    `q = min(15, trunc(x * (1/d) + 8.5))`, `x_hat = (q - 8) * float16(d)`."""

    name = "q4_0"
    bits = 4
    codes_dtype = torch.uint8

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xb = to_blocks(x, self.block_size).float()
        index = xb.abs().argmax(dim=-1, keepdim=True)
        d = torch.gather(xb, -1, index) / -8.0
        raw = trunc_plus_8_5(xb * _reciprocal_or_zero(d))  # |x * id| <= 8 up to rounding
        return raw.clamp(0.0, 15.0), d, raw <= 15.0

    def _decode(self, qb: Tensor, d16: Tensor) -> Tensor:
        return (qb - 8.0) * d16.float()

    def learnable_grid(self) -> "Q4_0Grid":
        return Q4_0Grid()


class Q4_0Grid(IntAffine):
    """Q4_0 with a given block scale `d` (learned ranges, GPTQ): codes `clamp(round(x / d) + 8, 0, 15)`,
    values `(q - 8) * d`, `d` rounded to float16 for both, as Q4_0 stores it; `quantize_with_qparams`
    gives Q4_0's own codes and scales, so llama.cpp reads exactly what was trained.

    Like Q4_0's `d = m / -8`, a scale may be negative: the grid `(q - 8) * d` then reaches 8 steps on the
    positive side and 7 on the negative one. `choose_qparams` is Q4_0's own `d`; with it the grid differs
    from `GGUFQ4_0` only in encoding with the float16 `d` (llama.cpp encodes with the float32 one) and
    rounding ties to even: one code in a few thousand moves by a step. `covering_qparams` picks, per
    block, the sign whose grid holds the block's extremes with the smaller step.
    """

    scale_dtype = torch.float16
    smallest_scale = 2.0**-24
    """The smallest float16 magnitude: a smaller scale would round to 0."""

    def __init__(self) -> None:
        super().__init__(bits=4, symmetric=True, group_size=GGUF_BLOCK_SIZE, signed=False)
        self.name = "q4_0_grid"

    def grid_scale(self, scale: Tensor) -> Tensor:
        d16 = round_to_dtype(scale, torch.float16)
        return torch.where(d16 == 0, torch.copysign(torch.full_like(d16, self.smallest_scale), scale), d16)

    def choose_qparams(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        xb = self.blocks(x.detach()).float()
        d = torch.gather(xb, -1, xb.abs().argmax(dim=-1, keepdim=True))[..., 0] / -8.0
        d = d.reshape(self.scale_shape(x.shape))
        return d, torch.full_like(d, float(self.mid_point))

    @torch.no_grad()
    def covering_qparams(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        lo, hi = torch.aminmax(self.blocks(x.detach()).float(), dim=-1)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        positive = torch.maximum(hi / 7.0, -lo / 8.0)  # d > 0: values from -8 d to 7 d
        negative = torch.maximum(hi / 8.0, -lo / 7.0)  # d < 0: values from 7 d to -8 d
        floor = self.smallest_scale
        d = torch.where(negative < positive, -negative.clamp(min=floor), positive.clamp(min=floor))
        d = d.reshape(self.scale_shape(x.shape))
        return d, torch.full_like(d, float(self.mid_point))

    def quantize_with_qparams(self, x: Tensor, scale: Tensor, zero: Optional[Tensor]) -> QuantizedTensor:
        q = super().quantize_with_qparams(x, scale, zero)
        return QuantizedTensor(codes=q.codes, scale=self.grid_scale(scale.float()).to(torch.float16))
