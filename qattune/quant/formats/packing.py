"""Two 4-bit codes per byte along the last dimension (low nibble = even index)."""

from __future__ import annotations

import torch
from torch import Tensor

from qattune.errors import QattuneError


def pack_uint4(codes: Tensor) -> Tensor:
    """Pack uint8 codes 0..15 (last dim even) into bytes: `byte[j] = codes[2j] | codes[2j+1] << 4`."""
    if codes.shape[-1] % 2 != 0:
        raise QattuneError(
            f"cannot pack 4-bit codes with an odd last dimension ({codes.shape[-1]}): two codes share a byte"
        )
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_uint4(packed: Tensor) -> Tensor:
    """Inverse of `pack_uint4`: uint8 bytes -> uint8 codes 0..15 with twice the last dimension."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
