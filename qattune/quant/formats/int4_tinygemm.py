"""int4 weight-only with a float zero point: the layout of PyTorch's `_weight_int4pack_mm` (`4w`).

Per group of `group_size` inputs (float32 arithmetic): `scale = max(max - min, 1e-6) / 15`,
`q = clamp(round((x - min) / scale), 0, 15)`; the stored scale and `zero = min + 8 * scale` are
bfloat16, and `x_hat = (q - 8) * scale_bf16 + zero_bf16`. Codes are uint8 0..15.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qattune.errors import QattuneError
from qattune.quant.formats.base import NumericFormat, QuantizedTensor, to_blocks
from qattune.quant.formats.elements import divide, divide_by, round_to_dtype

_EPS = 1e-6  # smallest group range, as torchao's int4 weight-only QAT fake quantizer
_MID = 8.0


class Int4Tinygemm(NumericFormat):
    """Asymmetric int4 per group with a bf16 scale and a bf16 float zero (codes 0..15, mid-point 8)."""

    bits = 4

    def __init__(self, group_size: int = 128) -> None:
        if group_size <= 0:
            raise QattuneError(f"group_size must be a positive integer, got {group_size}")
        self.block_size = group_size
        self.name = "int4_tinygemm"

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xb = to_blocks(x, self.block_size).float()
        lo = xb.amin(dim=-1, keepdim=True)
        hi = xb.amax(dim=-1, keepdim=True)
        scale = divide((hi - lo).clamp(min=_EPS), 15.0)
        q = torch.round(divide_by(xb - lo, scale)).clamp(0.0, 15.0)
        zero = lo + _MID * scale
        return q, round_to_dtype(scale, torch.bfloat16), round_to_dtype(zero, torch.bfloat16)

    @staticmethod
    def _decode(qb: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        return (qb - _MID) * scale.float() + zero.float()

    def quantize(self, x: Tensor) -> QuantizedTensor:
        q, scale, zero = self._encode(x)
        codes = q.to(torch.uint8).reshape(x.shape)
        bf16 = torch.bfloat16
        return QuantizedTensor(codes=codes, scale=scale[..., 0].to(bf16), zero=zero[..., 0].to(bf16))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        qb = to_blocks(q.codes, self.block_size).float()
        x = self._decode(qb, q.scale.unsqueeze(-1), q.zero.unsqueeze(-1))
        return x.reshape(q.codes.shape).to(dtype)

    def fake_quantize_with_mask(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        # (x - min) / scale lies in [0, 15] up to rounding: nothing is ever clipped.
        q, scale, zero = self._encode(x)
        return self._decode(q, scale, zero).reshape(x.shape).to(x.dtype), None
