"""Clipped masks kept for the backward at one bit per element instead of one byte.

The straight-through estimator keeps, for each fake-quantized activation, a mask of the elements its
format clipped. As bool that is one byte per element: 2.26 GiB saved for one 8da4w training step of
Llama-3.2-1B (seq 2048, batch 4, bf16). Packed eight to a byte it is an eighth of that, and the step's
peak memory on an H100 measured 1.55 GiB lower (docs/benchmarks.md). The quantizer's `pack_masks`
option turns it on. It costs speed: the bits are packed in the forward's fused fake quantization (a
reduction over each 8 elements) and unpacked in the backward by two more elementwise passes, and on the
H100 8da4w's step measured 4-11% slower with it (noisy, on a host-bound step); on a CPU a bit store
measured 3-7x slower to write than the byte mask.

Layout: along the last axis, element `8 * j + i` is bit `i` of byte `j`; a width that is not a multiple
of 8 is padded with zeros (`numpy.packbits(..., bitorder="little")` per row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qattune.quant.formats.elements import constant_tensor

_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)


def _bit_values(device: torch.device) -> Tensor:
    """`[1, 2, 4, ..., 128]` as uint8 on `device`."""
    return constant_tensor(_BIT_VALUES, device, torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """bool `[..., n]` -> uint8 `[..., ceil(n / 8)]`, eight elements per byte (layout: module docstring)."""
    width = mask.shape[-1]
    if width % 8:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], 8 - width % 8)], dim=-1)
    bits = mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8) * _bit_values(mask.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, width: int) -> Tensor:
    """The bool mask `[..., width]` that `pack_mask` packed."""
    bits = (packed.unsqueeze(-1) & _bit_values(packed.device)) != 0
    return bits.reshape(*packed.shape[:-1], -1)[..., :width]
