"""Storage of a quantized weight: codes packed (two 4-bit codes per byte), scales, zeros, tensor scale.

`PackedWeight` is what a converted module keeps instead of a float weight and what save/load moves.
The buffers are named after their role so a state dict reads `<layer>.weight_packed`,
`<layer>.weight_scale`, `<layer>.weight_zero`, `<layer>.weight_global_scale`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qattune.quant.formats import NumericFormat, QuantizedTensor, pack_uint4, unpack_uint4

_INT4_OFFSET = 8  # signed int4 codes -8..7 are stored as 0..15

BUFFER_NAMES = ("weight_packed", "weight_scale", "weight_zero", "weight_global_scale")


def codes_dtype(fmt: NumericFormat) -> torch.dtype:
    """The dtype of `fmt`'s unpacked 4-bit codes (int8 for signed integer formats, else uint8)."""
    return getattr(fmt, "codes_dtype", torch.uint8)


def pack_codes(codes: Tensor, fmt: NumericFormat) -> Tensor:
    """Codes as stored: 4-bit formats two per byte (low nibble = even index), others unchanged."""
    if fmt.bits != 4:
        return codes
    if codes.dtype == torch.int8:
        codes = (codes.to(torch.int16) + _INT4_OFFSET).to(torch.uint8)
    return pack_uint4(codes)


def unpack_codes(packed: Tensor, fmt: NumericFormat) -> Tensor:
    """Inverse of `pack_codes`."""
    if fmt.bits != 4:
        return packed
    codes = unpack_uint4(packed)
    if codes_dtype(fmt) == torch.int8:
        codes = (codes.to(torch.int16) - _INT4_OFFSET).to(torch.int8)
    return codes


def packed_tensors(q: QuantizedTensor, fmt: NumericFormat) -> dict[str, Tensor]:
    """The buffers to store for `q` (absent parts left out)."""
    tensors = {"weight_packed": pack_codes(q.codes, fmt), "weight_scale": q.scale}
    if q.zero is not None:
        tensors["weight_zero"] = q.zero
    if q.global_scale is not None:
        tensors["weight_global_scale"] = q.global_scale
    return tensors


def quantized_tensor(
    fmt: NumericFormat,
    packed: Tensor,
    scale: Tensor,
    zero: Optional[Tensor] = None,
    global_scale: Optional[Tensor] = None,
) -> QuantizedTensor:
    """Rebuild the format's QuantizedTensor from stored buffers."""
    return QuantizedTensor(codes=unpack_codes(packed, fmt), scale=scale, zero=zero, global_scale=global_scale)
