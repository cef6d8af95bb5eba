"""A weight's fake-quantized copy, computed once per optimizer step and reused by every forward.

The weight only changes at the optimizer step, so its fake quantization is recomputed only when the
parameter may have changed: after any optimizer step if it requires grad (a process-wide optimizer step
hook counts them; fused AdamW updates parameters without bumping their version counters; a frozen
weight, such as LoRA's base, gets no gradient and is not updated by a step), or when its version counter (any
other in-place update, e.g. `load_state_dict`), storage, dtype or device changed. Between updates every
forward (gradient-accumulation micro-batches, activation checkpointing recomputes, evaluation) reads the
cache. Gradients stay exact: `CachedSTE` returns the cached tensor in the forward and, in the backward,
passes the gradient to the float weight where the straight-through estimator lets it through (the
format's bool not-clipped mask, one byte per weight, none for formats that never clip) and zero where it
clipped.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from qattune.quant.formats import NumericFormat
from qattune.quant.modules.fused import fake_quantize_with_mask as fused_fake_quantize_with_mask


_optimizer_steps = 0
_step_hook_handle = None


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _install_step_counter() -> None:
    """Count optimizer steps process-wide (installed once, on the first cache)."""
    global _step_hook_handle
    if _step_hook_handle is None:
        _step_hook_handle = register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps_seen() -> int:
    """How many optimizer steps ran in this process since the first weight cache was made."""
    return _optimizer_steps


class CachedSTE(torch.autograd.Function):
    """forward: the precomputed fake-quantized weight; backward: the gradient where not clipped."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, weight: Tensor, fake_quantized: Tensor, in_range: Optional[Tensor]
    ) -> Tensor:
        ctx.has_mask = in_range is not None
        if in_range is not None:
            ctx.save_for_backward(in_range)
        return fake_quantized.view_as(fake_quantized)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if not ctx.has_mask:
            return grad, None, None
        (in_range,) = ctx.saved_tensors
        return torch.where(in_range, grad, 0.0), None, None


class WeightFakeQuantCache:
    """Holds one weight's fake-quantized copy and STE mask, keyed on the weight's identity and version."""

    def __init__(self) -> None:
        _install_step_counter()
        self.key: Optional[tuple] = None
        self.fake_quantized: Optional[Tensor] = None
        self.in_range: Optional[Tensor] = None

    @staticmethod
    def _key_of(weight: Tensor) -> tuple:
        # a frozen weight (LoRA's base) gets no gradient, so no optimizer step can change it
        steps = _optimizer_steps if weight.requires_grad else -1
        return (steps, weight._version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape))

    def refresh(self, weight: Tensor, fmt: NumericFormat) -> None:
        """Recompute the cache if `weight` changed since the last call."""
        key = self._key_of(weight)
        if key != self.key:
            # normal tensors even under inference_mode, so training can reuse what evaluation cached
            with torch.inference_mode(False), torch.no_grad():
                self.fake_quantized, self.in_range = fused_fake_quantize_with_mask(fmt, weight.detach())
            self.key = key

    def clear(self) -> None:
        self.key = self.fake_quantized = self.in_range = None

    def apply(self, weight: Tensor) -> Tensor:
        """The cached fake-quantized weight, differentiable w.r.t. `weight` through the STE mask."""
        if not weight.requires_grad or not torch.is_grad_enabled():
            return self.fake_quantized
        return CachedSTE.apply(weight, self.fake_quantized, self.in_range)
