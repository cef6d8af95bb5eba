"""OCP Microscaling v1.0 (`mxfp8`, `mxfp4`): blocks of 32, one E8M0 power-of-two scale per block.

Shared exponent `floor(log2(amax)) - emax_elem` (8 for E4M3, 2 for E2M1), clamped to E8M0's
[-127, 127] (an all-zero block gets the smallest scale, 2**-127). Elements `x / 2**e` round to nearest
even in the element format and saturate at its largest finite value.

Storage: `QuantizedTensor.scale` holds the E8M0 scale as its uint8 BIASED EXPONENT (code = e + 127,
as MX hardware stores it; `scale.view(torch.float8_e8m0fnu)` is the same bytes as torch's E8M0 dtype);
`codes` is float8_e4m3fn (mxfp8) or uint8 E2M1 codes 0..15 (mxfp4). Codes and scales equal torchao's
`prototype.mx_formats.to_mx(..., ScaleCalculationMode.FLOOR)` bit for bit, except in blocks whose
largest magnitude is a float32 subnormal (below 2**-126): there the elements are `x / 2**-127` as the
OCP spec says, where torchao's differ.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from qattune.errors import QattuneError
from qattune.quant.formats.base import NumericFormat, QuantizedTensor, to_blocks
from qattune.quant.formats.elements import (
    E2M1_CLIP_THRESHOLD,
    E4M3_CLIP_THRESHOLD,
    e2m1_decode,
    e2m1_encode,
    e2m1_round,
    e8m0_decode,
    e8m0_encode,
    floor_log2,
    to_e4m3_saturated,
)

MX_BLOCK_SIZE = 32
_EMAX = {"fp8_e4m3": 8, "fp4_e2m1": 2}
_CLIP = {"fp8_e4m3": E4M3_CLIP_THRESHOLD, "fp4_e2m1": E2M1_CLIP_THRESHOLD}


class MXFormat(NumericFormat):
    """OCP MX with FP8 E4M3 (`mxfp8`) or FP4 E2M1 (`mxfp4`) elements."""

    block_size = MX_BLOCK_SIZE

    def __init__(self, element: Literal["fp8_e4m3", "fp4_e2m1"]) -> None:
        if element not in _EMAX:
            raise QattuneError(f"unknown MX element type {element!r}; use one of {sorted(_EMAX)}")
        self.element = element
        self.bits = 8 if element == "fp8_e4m3" else 4
        self.name = "mxfp8" if element == "fp8_e4m3" else "mxfp4"

    def _scale_codes(self, xb: Tensor) -> Tensor:
        amax = xb.abs().amax(dim=-1, keepdim=True)
        return e8m0_encode(floor_log2(amax) - _EMAX[self.element])

    def _scaled(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Blocked elements in units of the block scale, the scale codes and the scale values."""
        xb = to_blocks(x, self.block_size).float()
        scale_code = self._scale_codes(xb)
        scale = e8m0_decode(scale_code)
        return xb / scale, scale_code, scale

    def quantize(self, x: Tensor) -> QuantizedTensor:
        v, scale_code, _ = self._scaled(x)
        codes = to_e4m3_saturated(v) if self.element == "fp8_e4m3" else e2m1_encode(v)
        return QuantizedTensor(codes=codes.reshape(x.shape), scale=scale_code[..., 0])

    def element_values(self, codes: Tensor) -> Tensor:
        """Float32 values of element codes (before the block scale)."""
        return codes.float() if self.element == "fp8_e4m3" else e2m1_decode(codes)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        elements = to_blocks(self.element_values(q.codes), self.block_size)
        return (elements * e8m0_decode(q.scale).unsqueeze(-1)).reshape(q.codes.shape).to(dtype)

    def fake_quantize_with_mask(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        v, _, scale = self._scaled(x)
        rounded = to_e4m3_saturated(v).float() if self.element == "fp8_e4m3" else e2m1_round(v)
        in_range = v.abs() < _CLIP[self.element]
        return (rounded * scale).reshape(x.shape).to(x.dtype), in_range.reshape(x.shape)
