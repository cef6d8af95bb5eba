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
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
from torch import Tensor

from qattune.quant.fake_quant import fake_quantize_ste
from qattune.quant.formats import NumericFormat


def _forget_output(owner_ref: weakref.ref, output_ref: weakref.ref, grad_outputs) -> None:
    """Backward reached the node of a remembered output: forget it, if it is still the one remembered."""
    owner = owner_ref()
    if owner is not None and owner._output is not None and owner._output is output_ref():
        owner.clear()


class SharedActivationFakeQuant:
    """`fmt.fake_quantize(x)`, reusing the last result when `x` is the tensor it saw last."""

    def __init__(self, fmt: NumericFormat, pack_masks: bool = False) -> None:
        self.format = fmt
        self.pack_masks = pack_masks  # clipped masks kept bit-packed for the backward (`modules.packed_mask`)
        self._input: Optional[weakref.ref] = None
        self._output: Optional[Tensor] = None
        self._state: tuple = ()

    def __call__(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or x.is_inference():  # inference tensors have no version counter
            return fake_quantize_ste(x, self.format, grad_in_place=True, pack_mask=self.pack_masks)
        state = (x._version, torch.is_grad_enabled())
        if self._input is not None and self._input() is x and self._state == state:
            return self._output
        # only the layers' own matmuls read the result, so its gradient may be zeroed in place
        out = fake_quantize_ste(x, self.format, grad_in_place=True, pack_mask=self.pack_masks)
        self._input, self._output, self._state = weakref.ref(x), out, state
        if out.grad_fn is not None:  # once backward consumes its graph, the result must not be reused
            # The hook holds neither the node nor this object strongly: a node whose own hook refers back
            # to it is a cycle through C++ that the garbage collector cannot free (it leaked each step's
            # autograd graph).
            out.grad_fn.register_prehook(functools.partial(_forget_output, weakref.ref(self), weakref.ref(out)))
        return out

    def __getstate__(self) -> dict:  # copies and pickles carry the settings, not the remembered tensors
        return {"format": self.format, "pack_masks": self.pack_masks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["format"], state.get("pack_masks", False))

    def clear(self) -> None:
        """Drop the remembered activation."""
        self._input, self._output, self._state = None, None, ()
