"""Optimizer builders usable as `_component_`s (the recipe passes the trainable parameters first)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Fused AdamW runs on CUDA/XPU/MPS and on CPU in recent PyTorch; all params must share one kind."""
    device_types = {p.device.type for p in params}
    return len(device_types) == 1 and device_types.pop() in ("cuda", "xpu", "mps", "cpu") and all(
        p.is_floating_point() for p in params
    )


def AdamW(
    params: Iterable[torch.Tensor],
    lr: float = 2e-5,
    weight_decay: float = 0.01,
    betas: Optional[list[float]] = None,
    eps: float = 1e-8,
    fused: Optional[bool] = None,
) -> torch.optim.AdamW:
    """torch.optim.AdamW over the parameters that require grad; `fused=None` picks the fused
    implementation where the parameters' device supports it (else the foreach one)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("AdamW got no trainable parameters (every parameter has requires_grad=False)")
    use_fused = _fused_supported(trainable) if fused is None else fused
    beta1, beta2 = betas if betas is not None else (0.9, 0.999)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=(beta1, beta2), eps=eps, fused=use_fused)
