"""A fake-quantized Linear whose backward recomputes fake-quantized tensors instead of keeping them.

`F.linear(fake_quantize(x), fake_quantize(w), b)` makes autograd keep, until the backward, the
fake-quantized weight (and the weight cache keeps it between steps: one extra copy of every weight), the
fake-quantized activation in place of the float one, and the activation's clipped mask (one byte per
element): most of QAT's memory over float training on a GPU (docs/benchmarks.md).
`recomputed_fake_quant_linear` keeps the float weight (a parameter, held anyway) and, with an activation
format, the float input (the tensor float training keeps for this matmul), and quantizes them again in the
backward, with their clipped masks for the straight-through gradients. The gradients are those of the
stored path: the same matmuls on the same values, the same elements zeroed.

Layers that read one input (q/k/v, gate/up) quantize it once in the forward (`SharedActivationFakeQuant`)
and once in the backward: the first of them to run its backward recomputes it into a `RecomputedActivation`
they share, and the last one frees it. Under torch.compile each layer recomputes, and the compiler's
common-subexpression elimination merges the copies.

On a GPU each compiled call from Python costs the host about 0.15 ms, longer than the kernels it
launches, and a step with recomputed weights made two per layer: the host, not the device, set the pace.
So the weights of one transformer block are quantized together (`RecomputedWeights`): the first of its
layers to need its weight, in the forward or in the backward, quantizes all of them in one compiled call,
and each layer takes its own (at most one block's weights are held at a time).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from qattune.quant.fake_quant import zero_where_clipped
from qattune.quant.formats import NumericFormat
from qattune.quant.modules.fused import fake_quantize_clipped, fake_quantize_many_into, fusable

BATCHED_RECOMPUTE_DEVICES = ("cuda",)
"""Where `RecomputedWeights` batches (as `weight_cache.BATCHED_REFRESH_DEVICES`: on a CPU the calls are
cheap next to the work, and each batched graph costs seconds of C++ compilation)."""


class RecomputedActivation:
    """One input's fake quantization, shared by the backward passes of the layers that read it."""

    __slots__ = ("readers", "value", "clipped")

    def __init__(self) -> None:
        self.readers = 0  # layers whose backward has yet to use it
        self.value: Optional[Tensor] = None
        self.clipped: Optional[Tensor] = None

    def get(self, fmt: NumericFormat, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The fake-quantized `x` and its clipped mask, computed by the first reader and dropped after the last."""
        if self.value is None:
            self.value, self.clipped = fake_quantize_clipped(fmt, x)
        value, clipped = self.value, self.clipped
        self.readers -= 1
        if self.readers <= 0:
            self.value = self.clipped = None
        return value, clipped


def _weight_key(weight: Tensor) -> tuple:
    """Identifies a weight's values: address, version, shape and dtype."""
    return weight.data_ptr(), weight._version, weight.shape, weight.dtype


class RecomputedWeights:
    """The fake-quantized weights of the recomputing Linear layers of one block (one format), computed
    together: the first layer to ask, in the forward or in the backward, gets all of them quantized in
    one compiled call, and each layer then takes its own (the forward's without, the backward's with
    clipped masks). A layer whose weight changed since, or that the batch could not take, is quantized
    on its own, so the values are always those of `fake_quantize_clipped(fmt, weight)`."""

    def __init__(self, fmt: NumericFormat) -> None:
        self.format = fmt
        self.members: list[nn.Module] = []  # FakeQuantLinear layers with `recompute_weight`
        self._ready: tuple[dict, dict] = ({}, {})  # forward's and backward's: id(layer) -> (key, value, clipped)
        self._unbatched: set[int] = set()  # layers the last batch could not take: quantized on their own
        self._clips: Optional[bool] = None  # whether the format has clipped masks (learned on first use)

    def take(self, layer: nn.Module, weight: Tensor, with_mask: bool) -> tuple[Tensor, Optional[Tensor]]:
        """`fake_quantize_clipped(self.format, weight)` for `layer` (the mask only `with_mask`)."""
        if weight.device.type in BATCHED_RECOMPUTE_DEVICES:
            ready, key = self._ready[with_mask], _weight_key(weight)
            entry = ready.pop(id(layer), None)
            if (entry is None or entry[0] != key) and id(layer) not in self._unbatched:
                self._quantize_all(ready, with_mask)
                entry = ready.pop(id(layer), None)
            if entry is not None and entry[0] == key:
                return entry[1], entry[2]
        weight_hat, clipped = fake_quantize_clipped(self.format, weight.detach())
        return weight_hat, clipped if with_mask else None

    def _quantize_all(self, ready: dict, with_mask: bool) -> None:
        """Quantize the weights of every member that recomputes now, in one call, into `ready`."""
        ready.clear()
        batch = [(layer, layer.weight.detach()) for layer in self.members if layer.fake_quant_enabled
                 and layer._recomputes_weight() and not isinstance(layer.weight, DTensor)
                 and fusable(self.format, layer.weight)]
        self._unbatched = {id(layer) for layer in self.members}
        if len(batch) < 2:
            return
        if self._clips is None:
            self._clips = fake_quantize_clipped(self.format, batch[0][1][:1])[1] is not None
        outs = [torch.empty_like(w) for _, w in batch]
        clipped = [torch.empty_like(w, dtype=torch.bool) if with_mask and self._clips else None for _, w in batch]
        if fake_quantize_many_into(self.format, [w for _, w in batch], outs, clipped):
            ready.update({id(layer): (_weight_key(w), out, mask)
                          for (layer, w), out, mask in zip(batch, outs, clipped)})
            self._unbatched -= set(ready)


class _RecomputedFakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_format: Optional[NumericFormat],
        activation_format: Optional[NumericFormat], x_hat: Optional[Tensor], shared: Optional[RecomputedActivation],
        weights: Optional[tuple[RecomputedWeights, nn.Module]],
    ) -> Tensor:
        if activation_format is not None and x_hat is None:
            x_hat, _ = fake_quantize_clipped(activation_format, x.detach())
        weight_hat = weight
        if weight_format is not None:
            weight_hat = _quantize_weight(weight_format, weights, weight, with_mask=False)[0]
        ctx.formats, ctx.shared, ctx.weights = (weight_format, activation_format), shared, weights
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x if x_hat is None else x_hat, weight_hat, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        weight_format, activation_format = ctx.formats
        weight_clipped = x_clipped = None
        with torch.no_grad():
            if weight_format is not None:
                weight, weight_clipped = _quantize_weight(weight_format, ctx.weights, weight, with_mask=True)
            if activation_format is not None:
                recomputed = ctx.shared if ctx.shared is not None else RecomputedActivation()
                x, x_clipped = recomputed.get(activation_format, x.detach())
        # matmuls in the gradient's dtype (the forward's under autocast), results in the inputs' dtypes
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight.to(grad.dtype)).to(x.dtype)
            if x_clipped is not None:
                grad_x = zero_where_clipped(grad_x, x_clipped, in_place=True)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = grad_2d.t().mm(x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(weight.dtype)
            if weight_clipped is not None:
                grad_w.masked_fill_(weight_clipped, 0.0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _quantize_weight(fmt: NumericFormat, weights: Optional[tuple[RecomputedWeights, nn.Module]], weight: Tensor,
                     with_mask: bool) -> tuple[Tensor, Optional[Tensor]]:
    if weights is not None:
        group, layer = weights
        return group.take(layer, weight, with_mask)
    return fake_quantize_clipped(fmt, weight.detach())


def recomputed_fake_quant_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_format: Optional[NumericFormat],
    activation_format: Optional[NumericFormat] = None, x_hat: Optional[Tensor] = None,
    shared: Optional[RecomputedActivation] = None, weights: Optional[tuple[RecomputedWeights, nn.Module]] = None,
) -> Tensor:
    """`F.linear(fake_quantize(x), fake_quantize(weight), bias)` with straight-through gradients, keeping
    only `x` and `weight` for the backward.

    weight_format: the weight's format (None: `weight` is used as given, e.g. a cached fake-quantized
        weight with its own gradient).
    activation_format: the input's format (None: `x` is used as given).
    x_hat, shared: the input's fake quantization if already computed, and the `RecomputedActivation`
        the layers reading `x` share in the backward (None: this layer recomputes on its own).
    weights: the `RecomputedWeights` of this layer's block and the layer (None, or under torch.compile:
        the weight is quantized on its own).
    """
    if torch.compiler.is_compiling():
        weights = None
    return _RecomputedFakeQuantLinear.apply(x, weight, bias, weight_format, activation_format, x_hat, shared, weights)
