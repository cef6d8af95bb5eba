"""Activation fake quantization shared by layers that read the same input (q/k/v, gate/up).

Layers that read one tensor (the attention's q, k and v projections; the MLP's gate and up projections)
would fake-quantize it two or three times. A `SharedActivationFakeQuant` remembers its last input (by
weak reference) and its last output: when the very same tensor (same object, same version, same grad
mode) comes again, the result is reused — one quantize-dequantize and one autograd node for all readers,
which is exact. A result is forgotten as soon as backward reaches its autograd node (its saved tensors
are freed then), so a tensor fed again after a backward pass is quantized afresh. It holds at most one
activation (its last output; one per activation format per model, since a quantizer gives all layers
with one format the same instance). Eager mode only: under torch.compile the compiler's
common-subexpression elimination does the same.

With `recompute` (the quantizer's `recompute_activations`) the layers keep their float input for the
backward instead of its fake quantization and clipped mask, and quantize it again there
(`modules.recompute`): `linear` is that layer, sharing one quantization per input in the forward and one
in the backward.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from qattune.quant.fake_quant import fake_quantize_ste
from qattune.quant.formats import NumericFormat
from qattune.quant.modules.fused import fake_quantize_clipped
from qattune.quant.modules.recompute import RecomputedActivation, RecomputedWeights, recomputed_fake_quant_linear


def _forget_output(owner_ref: weakref.ref, output_ref: weakref.ref, grad_outputs) -> None:
    """Backward reached the node of a remembered output: forget it, if it is still the one remembered."""
    owner = owner_ref()
    if owner is not None and owner._output is not None and owner._output is output_ref():
        owner.clear()


def _forget_when_backward_reaches(owner: "SharedActivationFakeQuant", output: Tensor, remembered: object) -> None:
    """Once backward reaches `output`'s node, `owner` forgets `remembered` (if it still holds it). The hook
    holds neither the node nor the owner strongly: a node whose own hook refers back to it is a cycle
    through C++ that the garbage collector cannot free (it leaked each step's autograd graph)."""
    if output.grad_fn is not None:
        output.grad_fn.register_prehook(functools.partial(_forget_output, weakref.ref(owner), weakref.ref(remembered)))


class _QuantizedInput:
    """What `SharedActivationFakeQuant.linear` remembers of its last input."""

    __slots__ = ("x_hat", "shared", "__weakref__")

    def __init__(self, x_hat: Tensor) -> None:
        self.x_hat, self.shared = x_hat, RecomputedActivation()


class SharedActivationFakeQuant:
    """`fmt.fake_quantize(x)`, reusing the last result when `x` is the tensor it saw last."""

    def __init__(self, fmt: NumericFormat, recompute: bool = False) -> None:
        self.format = fmt
        self.recompute = recompute  # layers quantize their input again in the backward (`linear`)
        self._input: Optional[weakref.ref] = None
        self._output: Optional[object] = None  # the STE's output, or `linear`'s `_QuantizedInput`
        self._state: tuple = ()

    def _remembered(self, x: Tensor, state: tuple) -> Optional[object]:
        if self._input is not None and self._input() is x and self._state == state:
            return self._output
        return None

    def __call__(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or x.is_inference():  # inference tensors have no version counter
            return fake_quantize_ste(x, self.format, grad_in_place=True)
        state = (x._version, torch.is_grad_enabled())
        remembered = self._remembered(x, state)
        if remembered is not None:
            return remembered
        # only the layers' own matmuls read the result, so its gradient may be zeroed in place
        out = fake_quantize_ste(x, self.format, grad_in_place=True)
        self._input, self._output, self._state = weakref.ref(x), out, state
        _forget_when_backward_reaches(self, out, out)  # once backward consumes its graph, it must not be reused
        return out

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_format: Optional[NumericFormat],
               weights: Optional[tuple[RecomputedWeights, nn.Module]] = None) -> Tensor:
        """The `recompute` layer: `recomputed_fake_quant_linear` of `x` in this format (`weight_format`,
        `weights`: as there), sharing the input's quantization with the other layers that read `x`, in
        the forward and in the backward."""
        if torch.compiler.is_compiling() or x.is_inference():
            return recomputed_fake_quant_linear(x, weight, bias, weight_format, self.format)
        state = (x._version, "recompute")
        remembered = self._remembered(x, state)
        if remembered is None:
            with torch.no_grad():
                remembered = _QuantizedInput(fake_quantize_clipped(self.format, x.detach())[0])
        remembered.shared.readers += 1
        out = recomputed_fake_quant_linear(x, weight, bias, weight_format, self.format, remembered.x_hat,
                                           remembered.shared, weights)
        if remembered is not self._output:
            self._input, self._output, self._state = weakref.ref(x), remembered, state
            _forget_when_backward_reaches(self, out, remembered)  # frees x_hat for the backward
        return out

    def __getstate__(self) -> dict:  # copies and pickles carry the settings, not the remembered tensors
        return {"format": self.format, "recompute": self.recompute}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["format"], state.get("recompute", False))

    def clear(self) -> None:
        """Drop the remembered activation."""
        self._input, self._output, self._state = None, None, ()
