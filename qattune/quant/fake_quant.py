"""Fake quantization with the straight-through estimator (STE).

Forward: the format's quantize-dequantize (`fmt.fake_quantize_with_mask`), computed without autograd
(compiled for large tensors in eager mode, with the same numbers: see `modules.fused`).
Backward: the incoming gradient where the value was inside the format's range, zero where it was
clipped. Only a clipped mask is saved, and only where something can have been clipped: not for formats
that cannot clip with their dynamic scales, and, on a CPU, not for a tensor none of whose elements
clipped, which is the usual case for float32 int8 per-token activations (their scale and zero point map
each token's minimum and maximum onto the end codes, so only a rounding tie at an end can clip). On a GPU
that check would read a flag back from the device, a sync per activation that would stop the host from
queueing work ahead, so the mask is kept there (with bf16 scales a token's maximum often does clip by a
code); under torch.compile it is kept too (a data-dependent branch would break the graph). The mask is
one byte per element (the quantizer's `recompute_activations` keeps none: `modules.recompute`).

Inside qattune's modules, whose fake-quantized tensors only feed their own matmul, the few clipped
elements are zeroed in place in the gradient autograd made for that use (`zero_where_clipped`): a
sparse write instead of a pass that copies the whole gradient. A clipped element's gradient is +0, also
where the incoming one was -0, NaN or infinite.

"Clipped" means the final clamp changed the value: the rounded value lay outside the representable
range (torchao's convention for integers: `qmin <= round(x / scale) + zp <= qmax`; for float elements,
`|x / scale|` at or beyond the midpoint above the largest finite value).

The code is plain tensor code under an `autograd.Function`, which `torch.compile` traces and fuses.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor

from qattune.quant.modules.fused import fake_quantize_clipped


class MaskedFakeQuantizer(Protocol):
    """What the STE needs from a format: forward values and the not-clipped mask (or None)."""

    def fake_quantize_with_mask(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]: ...


def zero_where_clipped(grad: Tensor, clipped: Tensor, in_place: bool) -> Tensor:
    """`grad` with the clipped elements set to 0. `in_place` is for callers whose output only feeds their
    own matmul, so the gradient is one autograd made for this backward alone (never a caller's tensor);
    it applies to plain contiguous gradients, anything else is zeroed on a copy."""
    if in_place and grad.is_contiguous() and not grad.requires_grad:
        return grad.masked_fill_(clipped, 0.0)
    return grad.masked_fill(clipped, 0.0)


def _any_set(mask: Tensor) -> bool:
    """Whether a bool mask holds a True: read as bytes, since `Tensor.any` on a CPU bool tensor took
    about 35x as long (335 against 9 us for a 1024 x 1536 activation)."""
    return bool(mask.view(torch.uint8).max()) if mask.numel() else False


class _STEFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, fmt: MaskedFakeQuantizer, grad_in_place: bool
    ) -> Tensor:
        x_hat, clipped = fake_quantize_clipped(fmt, x)
        if clipped is not None and not torch.compiler.is_compiling():
            if not ctx.needs_input_grad[0] or (clipped.device.type == "cpu" and not _any_set(clipped)):
                clipped = None  # no backward, or nothing clipped (the rule for per-token activations)
        ctx.has_mask = clipped is not None
        ctx.grad_in_place = grad_in_place
        if clipped is not None:
            ctx.save_for_backward(clipped)
        return x_hat

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], None, None]:  # type: ignore[override]
        if not ctx.has_mask:
            return grad, None, None
        (clipped,) = ctx.saved_tensors
        return zero_where_clipped(grad, clipped, ctx.grad_in_place), None, None


def fake_quantize_ste(x: Tensor, fmt: MaskedFakeQuantizer, grad_in_place: bool = False) -> Tensor:
    """`fmt`'s fake quantization of `x`, with the straight-through gradient (zero where clipped).
    `grad_in_place=True` (for an output that only feeds the caller's own matmul) zeroes the incoming
    gradient in place instead of copying it."""
    return _STEFakeQuantize.apply(x, fmt, grad_in_place)


class _STEWithQParams(torch.autograd.Function):
    """STE for an int format with given (non-learned) qparams."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt, scale: Tensor, zero: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        x_hat, in_range = fmt.fake_quantize_with_qparams(x, scale, zero)
        ctx.save_for_backward(in_range)
        return x_hat

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (in_range,) = ctx.saved_tensors
        return torch.where(in_range, grad, 0.0), None, None, None


def fake_quantize_with_qparams(x: Tensor, fmt, scale: Tensor, zero: Optional[Tensor] = None) -> Tensor:
    """Fake-quantize `x` with an `IntAffine` format and fixed qparams (STE; no gradient to the qparams)."""
    return _STEWithQParams.apply(x, fmt, scale.detach(), None if zero is None else zero.detach())
