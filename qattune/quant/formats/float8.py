"""FP8 E4M3 per row (weights) / per token (activations), the `fp8` scheme (`torch._scaled_mm` target).

`scale = max(amax, 1e-12) / 448` (float32, one per row), `codes = e4m3(clamp(x / scale, -448, 448))`,
`x_hat = float(codes) * scale`. The 1e-12 floor (torchao's `hp_value_lb`) keeps all-zero rows finite.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qattune.quant.formats.base import NumericFormat, QuantizedTensor
from qattune.quant.formats.elements import E4M3_MAX, divide, divide_by, to_e4m3_saturated

_AMAX_FLOOR = 1e-12


class Float8Rowwise(NumericFormat):
    """FP8 E4M3 with one float32 scale per row / token (scale shape `x.shape[:-1] + (1,)`)."""

    name = "float8_rowwise"
    bits = 8
    block_size = None

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float()
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_AMAX_FLOOR)
        scale = divide(scale, E4M3_MAX)
        return to_e4m3_saturated(divide_by(xf, scale)), scale

    def quantize(self, x: Tensor) -> QuantizedTensor:
        codes, scale = self._encode(x)
        return QuantizedTensor(codes=codes, scale=scale)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return (q.codes.float() * q.scale.float()).to(dtype)

    def fake_quantize_with_mask(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        # |x / scale| <= 448 up to one rounding: nothing is ever clipped.
        codes, scale = self._encode(x)
        return (codes.float() * scale).to(x.dtype), None
