"""A weight's fake-quantized copy, computed once per optimizer step and reused by every forward.

The weight only changes at the optimizer step, so its fake quantization is recomputed only when the
parameter may have changed: after any optimizer step if it requires grad (a process-wide optimizer step
hook counts them; fused AdamW updates parameters without bumping their version counters; a frozen
weight, such as LoRA's base, gets no gradient and is not updated by a step), or when its version counter (any
other in-place update, e.g. `load_state_dict`), storage, dtype or device changed. Between updates every
forward (gradient-accumulation micro-batches, activation checkpointing recomputes, evaluation) reads the
cache. Gradients stay exact: `CachedSTE` returns the cached tensor in the forward and, in the backward,
passes the gradient to the float weight where the straight-through estimator lets it through and zero
where it clipped (the format's bool clipped mask, one byte per weight, none for formats that never clip;
the few clipped elements are zeroed in place).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from qattune.quant.formats import NumericFormat
from qattune.quant.fake_quant import zero_where_clipped
from qattune.quant.modules.fused import fake_quantize_clipped, fake_quantize_into, fake_quantize_many_into


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
    """forward: the precomputed fake-quantized weight; backward: the gradient, zeroed where clipped."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, weight: Tensor, fake_quantized: Tensor, clipped: Optional[Tensor], grad_in_place: bool
    ) -> Tensor:
        ctx.has_mask = clipped is not None
        ctx.grad_in_place = grad_in_place
        if clipped is not None:
            ctx.save_for_backward(clipped)
        return fake_quantized.view_as(fake_quantized)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if not ctx.has_mask:
            return grad, None, None, None
        (clipped,) = ctx.saved_tensors
        return zero_where_clipped(grad, clipped, ctx.grad_in_place), None, None, None


class WeightFakeQuantCache:
    """Holds one weight's fake-quantized copy and clipped mask, keyed on the weight's identity and version.

    A refresh writes into the buffers of the last one when they fit (one compiled in-place pass), so a
    training step allocates nothing for its fake-quantized weights.
    """

    def __init__(self) -> None:
        _install_step_counter()
        self.key: Optional[tuple] = None
        self.fake_quantized: Optional[Tensor] = None
        self.clipped: Optional[Tensor] = None

    @staticmethod
    def _key_of(weight: Tensor) -> tuple:
        # a frozen weight (LoRA's base) gets no gradient, so no optimizer step can change it
        steps = _optimizer_steps if weight.requires_grad else -1
        return (steps, weight._version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape))

    def _buffers_fit(self, weight: Tensor) -> bool:
        cached = self.fake_quantized
        return (cached is not None and cached.shape == weight.shape and cached.dtype == weight.dtype
                and cached.device == weight.device)

    def refresh(self, weight: Tensor, fmt: NumericFormat) -> None:
        """Recompute the cache if `weight` changed since the last call."""
        key = self._key_of(weight)
        if key == self.key:
            return
        # normal tensors even under inference_mode, so training can reuse what evaluation cached
        with torch.inference_mode(False), torch.no_grad():
            weight = weight.detach()
            if not (self._buffers_fit(weight) and fake_quantize_into(fmt, weight, self.fake_quantized, self.clipped)):
                self.fake_quantized, self.clipped = fake_quantize_clipped(fmt, weight)
        self.key = key

    def clear(self) -> None:
        self.key = self.fake_quantized = self.clipped = None

    def apply(self, weight: Tensor, grad_in_place: bool = False) -> Tensor:
        """The cached fake-quantized weight, differentiable w.r.t. `weight` through the STE mask
        (`grad_in_place`: see `qattune.quant.fake_quant.zero_where_clipped`)."""
        if not weight.requires_grad or not torch.is_grad_enabled():
            return self.fake_quantized
        return CachedSTE.apply(weight, self.fake_quantized, self.clipped, grad_in_place)


BATCHED_REFRESH_DEVICES = ("cuda",)
"""Where `refresh_caches` batches: on a GPU each per-layer call from Python leaves the device waiting;
on a CPU the batch saves about 2 ms a step (bench model) but its compiled graphs cost 15-20 s each to
build on 2 cores, which a short run never earns back."""
REFRESH_BATCH = 16  # weights per compiled call: graphs of one size and width are reused, whatever the rows


def refresh_caches(entries: list[tuple[WeightFakeQuantCache, Tensor, NumericFormat]]) -> None:
    """`cache.refresh(weight, fmt)` for each entry. On the devices in `BATCHED_REFRESH_DEVICES`, the
    caches that changed and already hold buffers of the right shape are refreshed together, up to
    `REFRESH_BATCH` weights of one format and width per compiled call (`fake_quantize_many_into`).
    Caches without buffers yet (the first refresh) and any a batch cannot take go one by one."""
    batches: dict[tuple, list[tuple[WeightFakeQuantCache, Tensor, NumericFormat, tuple]]] = {}
    for cache, weight, fmt in entries:
        key = cache._key_of(weight)
        if key == cache.key:
            continue
        if cache._buffers_fit(weight) and weight.device.type in BATCHED_REFRESH_DEVICES:
            batches.setdefault((repr(fmt), weight.shape[-1]), []).append((cache, weight, fmt, key))
        else:
            cache.refresh(weight, fmt)
    chunks = []
    for batch in batches.values():  # by shape: same-shape chunks share one graph (and one size symbol)
        batch.sort(key=lambda entry: tuple(entry[1].shape))
        chunks += [batch[i:i + REFRESH_BATCH] for i in range(0, len(batch), REFRESH_BATCH)]
    for chunk in chunks:  # formats with one repr quantize alike: the first one serves all
        with torch.inference_mode(False), torch.no_grad():
            weights = [weight.detach() for _, weight, _, _ in chunk]
            done = len(chunk) > 1 and fake_quantize_many_into(
                chunk[0][2], weights, [c.fake_quantized for c, *_ in chunk], [c.clipped for c, *_ in chunk])
        for cache, weight, fmt, key in chunk:
            if done:
                cache.key = key
            else:
                cache.refresh(weight, fmt)
