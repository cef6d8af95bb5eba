"""Integer affine quantization with torchao's conventions (`8da4w`, `8w`, `8da8w`).

Follows torchao `quant_primitives._choose_qparams_affine` and `_fake_quantize_affine` bit for bit:
the min/max, scale and zero point are computed in the INPUT dtype (a bf16 input gives a bf16-rounded
scale, stored as float32), `eps` defaults to `torch.finfo(input dtype).eps`, quantization multiplies
by the float32 reciprocal of the scale and rounds half to even, and the zero point is clamped to
[qmin, qmax]. The float32 arithmetic here reproduces those roundings by rounding to the input dtype
after each step torchao does in that dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qattune.errors import QattuneError
from qattune.quant.formats.base import NumericFormat, QuantizedTensor, to_blocks
from qattune.quant.formats.elements import divide, divide_by, reciprocal, round_to_dtype


class IntAffine(NumericFormat):
    """Signed or unsigned int-`bits`, symmetric or asymmetric, per group / per row (token) / per tensor.

    `group_size=None` quantizes each row (each token, for activations) with one scale;
    `per_tensor=True` uses one scale for the whole tensor. Codes are int8 (signed) or uint8
    (unsigned); the zero point, where there is one, is stored in the codes' dtype; scales are float32.
    """

    scale_dtype: Optional[torch.dtype] = None
    """Where set, the grid computes with its scales rounded to this dtype (the dtype a format stores them in)."""

    def __init__(
        self,
        bits: int,
        symmetric: bool,
        group_size: Optional[int],
        eps: Optional[float] = None,
        signed: bool = True,
        per_tensor: bool = False,
    ) -> None:
        if not 1 <= bits <= 8:
            raise QattuneError(f"integer formats support 1 to 8 bits, got bits={bits}")
        if group_size is not None and group_size <= 0:
            raise QattuneError(f"group_size must be a positive integer or None (per row), got {group_size}")
        if per_tensor and group_size is not None:
            raise QattuneError("per_tensor=True and a group_size are exclusive; set group_size=None")
        self.bits = bits
        self.symmetric = symmetric
        self.signed = signed
        self.per_tensor = per_tensor
        self.block_size = group_size
        self.eps = eps
        self.qmin = -(2 ** (bits - 1)) if signed else 0
        self.qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        # a symmetric grid's zero point: 0 for signed codes, 2^(bits-1) for unsigned ones
        self.mid_point = (self.qmax + self.qmin + 1) // 2
        self.codes_dtype = torch.int8 if signed else torch.uint8
        kind = "sym" if symmetric else "asym"
        self.name = f"{'int' if signed else 'uint'}{bits}_{kind}"

    # -- layout ---------------------------------------------------------------------------------
    def blocks(self, x: Tensor) -> Tensor:
        """`x` viewed as `(..., n_blocks, block)`: the elements that share one scale on the last axis."""
        if self.per_tensor:
            return x.reshape(1, 1, -1)
        return to_blocks(x, self.block_size)

    def scale_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale (and zero point) for a tensor of `shape`."""
        if self.per_tensor:
            return (1,)
        width = shape[-1]
        self.check_width(width)
        n_blocks = 1 if self.block_size is None else width // self.block_size
        return (*shape[:-1], n_blocks)

    def learnable_grid(self) -> "IntAffine":
        return self

    def grid_scale(self, scale: Tensor) -> Tensor:
        """The scale the grid computes with: `scale`, rounded to `scale_dtype` where that is set."""
        return scale if self.scale_dtype is None else round_to_dtype(scale, self.scale_dtype)

    # -- qparams --------------------------------------------------------------------------------
    def choose_qparams(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """torchao `_choose_qparams_affine`: float32 scale and (asymmetric / unsigned) float zero point.

        Returns scale and zero (integral float32 values, or None when it is 0) of `scale_shape(x.shape)`.
        """
        dtype = x.dtype
        eps = torch.finfo(dtype).eps if self.eps is None else self.eps
        xb = self.blocks(x.detach())
        if xb.shape[-1] == 0:  # an empty tensor (per-tensor scale): any scale will do
            xb = xb.new_zeros(*xb.shape[:-1], 1)
        levels = float(self.qmax - self.qmin)
        if self.symmetric:
            # torchao's max(-min(lo, 0), max(hi, 0)) is the largest magnitude, NaN included: one
            # reduction instead of two (a third faster compiled, for groups of 32)
            absmax = xb.abs().amax(dim=-1).float()
            scale = round_to_dtype(divide(absmax, levels / 2), dtype)
            scale = round_to_dtype(scale.clamp(min=eps), dtype)
            zero = None if self.mid_point == 0 else torch.full_like(scale, float(self.mid_point))
        else:
            lo, hi = torch.aminmax(xb, dim=-1)
            lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)
            span = round_to_dtype(hi - lo, dtype)
            scale = round_to_dtype(round_to_dtype(divide(span, levels), dtype).clamp(min=eps), dtype)
            zero = (self.qmin - torch.round(round_to_dtype(divide_by(lo, scale), dtype))).clamp(self.qmin, self.qmax)
        shape = self.scale_shape(x.shape)
        return scale.reshape(shape), None if zero is None else zero.reshape(shape)

    @torch.no_grad()
    def covering_qparams(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Per group, the smallest scale whose end codes hold the group's extremes: `max(max / qmax, min /
        qmin)` around the zero point, so the largest value maps to `qmax` or the most negative one to
        `qmin` and every value lies at least half a step inside the clipping boundary. The symmetric
        absmax scale maps the largest positive value to `qmax + 0.5` steps instead, the rounding boundary,
        where most such values round up and clip: with a fixed (learned) scale that weight gets no
        gradient from the start. Asymmetric formats map their range to their end codes already: their own
        qparams are returned."""
        if not self.symmetric:
            return self.choose_qparams(x)
        mid = self.mid_point
        lo, hi = torch.aminmax(self.blocks(x.detach()).float(), dim=-1)
        cover = torch.maximum(hi.clamp(min=0.0) / (self.qmax - mid), lo.clamp(max=0.0) / (self.qmin - mid))
        # float32's eps, not a bf16 input's (2**-7, above most 8-bit rows' max / 127): the scale is float32
        eps = torch.finfo(torch.float32).eps if self.eps is None else self.eps
        scale = cover.clamp(min=eps).reshape(self.scale_shape(x.shape))
        return scale, None if mid == 0 else torch.full_like(scale, float(mid))

    # -- element maps -----------------------------------------------------------------------------
    def _encode(self, x: Tensor, scale: Tensor, zero: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Float codes (clamped) and the not-clipped mask, in blocked layout."""
        xb = self.blocks(x).float()
        s = self.grid_scale(scale.reshape(*xb.shape[:-1], 1))
        q = torch.round(xb * reciprocal(s))
        if zero is not None:
            q = q + zero.reshape(s.shape)
        clamped = q.clamp(self.qmin, self.qmax)
        return clamped, clamped == q

    def _decode(self, qb: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
        s = self.grid_scale(scale.reshape(*qb.shape[:-1], 1).float())
        if zero is not None:
            qb = qb - zero.reshape(s.shape).float()
        return qb * s

    # -- public API -----------------------------------------------------------------------------
    def quantize_with_qparams(self, x: Tensor, scale: Tensor, zero: Optional[Tensor]) -> QuantizedTensor:
        """Quantize with given qparams (e.g. learned ones); `zero` must hold integral values."""
        qb, _ = self._encode(x, scale, zero)
        codes = qb.to(self.codes_dtype).reshape(x.shape)
        stored_zero = None if zero is None else zero.to(self.codes_dtype)
        return QuantizedTensor(codes=codes, scale=scale.float(), zero=stored_zero)

    def quantize(self, x: Tensor) -> QuantizedTensor:
        scale, zero = self.choose_qparams(x)
        return self.quantize_with_qparams(x, scale, zero)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        qb = self.blocks(q.codes).float()
        return self._decode(qb, q.scale, q.zero).reshape(q.codes.shape).to(dtype)

    def fake_quantize_with_qparams(
        self, x: Tensor, scale: Tensor, zero: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Forward of fake quantization with given qparams, and the not-clipped mask."""
        qb, in_range = self._encode(x, scale, zero)
        xq = self._decode(qb, scale, zero)
        return xq.reshape(x.shape).to(x.dtype), in_range.reshape(x.shape)

    def fake_quantize_with_mask(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        scale, zero = self.choose_qparams(x)
        return self.fake_quantize_with_qparams(x, scale, zero)
