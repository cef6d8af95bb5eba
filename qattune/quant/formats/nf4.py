"""NormalFloat4 (`nf4`, QLoRA): blocks of 64, float32 absmax per block, 16 NormalFloat levels.

Each `x / absmax` maps to the nearest level; a value exactly halfway between two levels maps to the
lower one (bitsandbytes' `>` thresholds; torchao's first-argmin). An all-zero block has absmax 0 and
codes 7 (the level 0.0). Codes are uint8 0..15 (index into NF4_LEVELS).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qattune.errors import QattuneError
from qattune.quant.formats.base import NumericFormat, QuantizedTensor, to_blocks
from qattune.quant.formats.elements import constant_tensor, divide_by

NF4_LEVELS = (
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0,
)  # fmt: skip


# Decision thresholds: float32 midpoints between neighbouring levels.
_LEVELS_F32 = torch.tensor(NF4_LEVELS, dtype=torch.float32)
_MIDPOINTS = tuple(((_LEVELS_F32[1:] + _LEVELS_F32[:-1]) / 2).tolist())


class NF4(NumericFormat):
    """NF4 with one float32 absmax per block of `block_size` values."""

    name = "nf4"
    bits = 4

    def __init__(self, block_size: int = 64) -> None:
        if block_size <= 0:
            raise QattuneError(f"block_size must be a positive integer, got {block_size}")
        self.block_size = block_size

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xb = to_blocks(x, self.block_size).float()
        absmax = xb.abs().amax(dim=-1, keepdim=True)
        v = divide_by(xb, torch.where(absmax > 0, absmax, torch.ones_like(absmax)))
        return torch.bucketize(v.contiguous(), constant_tensor(_MIDPOINTS, x.device), right=False), absmax

    def quantize(self, x: Tensor) -> QuantizedTensor:
        codes, absmax = self._encode(x)
        return QuantizedTensor(codes=codes.to(torch.uint8).reshape(x.shape), scale=absmax[..., 0])

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        values = to_blocks(constant_tensor(NF4_LEVELS, q.codes.device)[q.codes.long()], self.block_size)
        return (values * q.scale.float().unsqueeze(-1)).reshape(q.codes.shape).to(dtype)

    def fake_quantize_with_mask(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        # |x / absmax| <= 1: nothing is ever clipped.
        codes, absmax = self._encode(x)
        return (constant_tensor(NF4_LEVELS, x.device)[codes] * absmax).reshape(x.shape).to(x.dtype), None
