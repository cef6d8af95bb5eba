"""Rotary position embeddings (RoPE), including Llama 3.1/3.2 frequency scaling.

qattune rotates q and k in Hugging Face's "half-split" layout: feature `j` of a head pairs with feature
`j + head_dim/2`. Meta's checkpoints and GGUF's llama files pair features `2j` and `2j+1` instead; the
state-dict adapters permute q/k rows when reading or writing those formats.

Frequencies are computed in float32 from the positions at every forward pass (a handful of tiny kernels).
There are no buffers, so a model built on the meta device and materialised with `to_empty` needs no
re-initialisation, any position id works (packed sequences, long generation), and nothing is sharded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RopeConfig:
    """Everything that determines the rotation angles.

    `scaling_factor` set means Llama 3.1-style scaling: wavelengths longer than
    `original_max_seq_len / low_freq_factor` are slowed down by `scaling_factor`, those shorter than
    `original_max_seq_len / high_freq_factor` are kept, and the band between is interpolated smoothly.
    """

    head_dim: int
    base: float = 10000.0
    scaling_factor: Optional[float] = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


def inverse_frequencies(cfg: RopeConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The `head_dim/2` angular frequencies (float32), scaled as `cfg` says."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.base**exponents)
    if cfg.scaling_factor is None:
        return inv_freq
    return _llama3_scale(inv_freq, cfg)


def _llama3_scale(inv_freq: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    factor = cfg.scaling_factor
    low_freq_wavelen = cfg.original_max_seq_len / cfg.low_freq_factor
    high_freq_wavelen = cfg.original_max_seq_len / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`; short ones are unchanged.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # The band in between blends the two, linearly in `original_max_seq_len / wavelen`.
    smooth = (cfg.original_max_seq_len / wavelen - cfg.low_freq_factor) / (
        cfg.high_freq_factor - cfg.low_freq_factor
    )
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def rotary_cos_sin(cfg: RopeConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles for `positions` ([B, S] or [S]), shaped [B|1, S, 1, head_dim/2]."""
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    inv_freq = inverse_frequencies(cfg, positions.device)
    angles = positions.float().unsqueeze(-1) * inv_freq  # [B, S, head_dim/2]
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, S, heads, head_dim] (half-split pairs), computed in float32, returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)
