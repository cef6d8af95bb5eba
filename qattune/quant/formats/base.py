"""The numeric-format protocol: quantize / dequantize / fake_quantize along the last dimension."""

from __future__ import annotations

from abc import ABC, abstractmethod

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from qattune.errors import QattuneError


@dataclass
class QuantizedTensor:
    """A tensor in a numeric format, with its codes unpacked (one code per input element).

    `codes` has the input's shape: int8/uint8 integer codes, a float8_e4m3fn tensor for FP8 formats,
    or uint8 codes 0..15 for 4-bit float formats (FP4 E2M1, NF4). `scale` (and `zero`, where the
    format has one) has shape `x.shape[:-1] + (n_blocks,)`, or `(1,)` for a per-tensor scale.
    """

    codes: Tensor
    scale: Tensor
    zero: Optional[Tensor] = None
    global_scale: Optional[Tensor] = None


def check_block_size(width: int, block_size: int) -> None:
    """Raise a QattuneError when `block_size` does not divide the quantized width."""
    if block_size <= 0 or width % block_size != 0:
        raise QattuneError(
            f"cannot quantize a tensor whose last dimension is {width} in blocks of {block_size}: "
            f"{width} is not a multiple of {block_size}; choose a group/block size that divides "
            f"{width} or keep this layer in float"
        )


def to_blocks(x: Tensor, block_size: Optional[int]) -> Tensor:
    """View `x` as `(..., n_blocks, block)` along its last dim (`block_size=None`: one block per row)."""
    if x.dim() == 0:
        raise QattuneError("cannot quantize a 0-dim tensor: formats quantize along the last dimension")
    width = x.shape[-1]
    block = width if block_size is None else block_size
    check_block_size(width, block)
    return x.reshape(*x.shape[:-1], width // block, block)


def from_blocks(xb: Tensor) -> Tensor:
    """Undo `to_blocks`."""
    return xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])


class NumericFormat(ABC):
    """A numeric format that quantizes along the last (reduction) dimension.

    Subclasses implement `quantize`, `dequantize` and `fake_quantize_with_mask`; the last returns the
    forward value of fake quantization (bit-exactly `dequantize(quantize(x), x.dtype)`) and a boolean
    mask of the elements that were NOT clipped (None when the format can never clip with its dynamic
    scales). `fake_quantize` wraps it in the straight-through-estimator autograd function.
    """

    name: str = "abstract"
    block_size: Optional[int] = None
    bits: int = 0

    @abstractmethod
    def quantize(self, x: Tensor) -> QuantizedTensor:
        """Codes and scales of `x`, quantized along its last dimension."""

    @abstractmethod
    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The values `q` stands for, in `dtype`."""

    @abstractmethod
    def fake_quantize_with_mask(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(quantize-dequantize of `x`, mask of the elements not clipped, or None if none can be)."""

    def fake_quantize(self, x: Tensor) -> Tensor:
        """Quantize-dequantize `x` with a straight-through gradient (zero where clipped)."""
        from qattune.quant.fake_quant import fake_quantize_ste

        return fake_quantize_ste(x, self)

    def learnable_grid(self) -> Optional["NumericFormat"]:
        """The integer grid (an `IntAffine`) that quantizes like this format with a given scale, for range
        learning and GPTQ; None when the format has no fixed-scale integer form."""
        return None

    def check_width(self, width: int) -> None:
        """Raise a QattuneError when this format cannot quantize rows of `width` elements."""
        if self.block_size is not None:
            check_block_size(width, self.block_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bits={self.bits}, block_size={self.block_size})"
