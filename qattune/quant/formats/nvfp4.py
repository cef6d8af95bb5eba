"""NVFP4 (`nvfp4`): FP4 E2M1 elements in blocks of 16, an FP8 E4M3 block scale, an fp32 tensor scale.

`s_t = amax(tensor) / (448 * 6)` (1.0 for an all-zero tensor); `s_b = e4m3(clamp(amax(block) / 6 / s_t,
2**-6, 448))` (the clamp is torchao's `nvfp4_quantize`: no zero or subnormal block scales);
elements `e2m1(clamp(x / (s_b * s_t), -6, 6))`; `x_hat = e * (s_b * s_t)`.

Storage: `codes` uint8 E2M1 codes 0..15, `scale` the float8_e4m3fn block scales, `global_scale` the
float32 tensor scale of shape (1,). Codes and scales equal torchao's `nvfp4_quantize` with
`per_tensor_amax_to_scale(amax)` bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qattune.quant.formats.base import NumericFormat, QuantizedTensor, to_blocks
from qattune.quant.formats.elements import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_NORMAL,
    divide,
    divide_by,
    e2m1_decode,
    e2m1_encode,
    e2m1_round,
)

NVFP4_BLOCK_SIZE = 16


class NVFP4(NumericFormat):
    """NVIDIA's two-level-scaled FP4."""

    name = "nvfp4"
    bits = 4
    block_size = NVFP4_BLOCK_SIZE

    def _scaled(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Blocked elements in units of the total scale, block scales (e4m3), tensor scale, total scale."""
        xb = to_blocks(x, self.block_size).float()
        block_amax = xb.abs().amax(dim=-1, keepdim=True)
        tensor_amax = block_amax.amax().reshape(1) if block_amax.numel() else block_amax.new_zeros(1)
        global_scale = torch.where(tensor_amax > 0, divide(tensor_amax, E4M3_MAX * E2M1_MAX), 1.0)
        block_scale = divide_by(divide(block_amax, E2M1_MAX), global_scale).clamp(E4M3_MIN_NORMAL, E4M3_MAX)
        block_scale = block_scale.to(torch.float8_e4m3fn)
        total = block_scale.float() * global_scale
        return divide_by(xb, total), block_scale, global_scale, total

    def quantize(self, x: Tensor) -> QuantizedTensor:
        v, block_scale, global_scale, _ = self._scaled(x)
        return QuantizedTensor(
            codes=e2m1_encode(v).reshape(x.shape), scale=block_scale[..., 0], global_scale=global_scale
        )

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        total = q.scale.float().unsqueeze(-1) * q.global_scale.float()
        elements = to_blocks(e2m1_decode(q.codes), self.block_size)
        return (elements * total).reshape(q.codes.shape).to(dtype)

    def fake_quantize_with_mask(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        # |v| <= 6 / (1 - 2**-4) < 7 (the e4m3 block scale rounds by at most 2**-4): never clipped.
        v, _, _, total = self._scaled(x)
        return (e2m1_round(v) * total).reshape(x.shape).to(x.dtype), None
