"""Statistics of a Linear layer's inputs over calibration batches (GPTQ's Hessian, AWQ's magnitudes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class InputStats:
    """Over the calibration tokens: per input channel `Σ |x|`, the Hessian `H = Σ x xᵀ`, and the count."""

    abs_sum: Tensor
    hessian: Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, features: int, device: torch.device) -> "InputStats":
        return cls(torch.zeros(features, device=device), torch.zeros(features, features, device=device))

    def add(self, x: Tensor) -> None:
        """Count the tokens of `x` [..., features]."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0)
        self.hessian.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def mean_abs(self) -> Tensor:
        """Each channel's mean magnitude (at least 1e-6, so that powers of it stay finite)."""
        return (self.abs_sum / max(self.tokens, 1)).clamp(min=1e-6)

    def scale_inputs(self, factors: Tensor) -> None:
        """The statistics of `x / factors` instead of `x`."""
        self.abs_sum /= factors
        self.hessian /= torch.outer(factors, factors)
