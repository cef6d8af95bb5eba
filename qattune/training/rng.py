"""Capture and restore every random number generator a training step can draw from."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and (when present) CUDA generators."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    numpy_state = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gauss))  # plain types: weights_only loads
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only: a resume may see other devices
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA only when both then and now have it)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved, device = state["cuda"], torch.cuda.current_device()
        if isinstance(saved, (list, tuple)):  # checkpoints before 2026-11 held every visible device's
            saved = saved[device] if device < len(saved) else None
        if saved is not None:
            torch.cuda.set_rng_state(saved, device)
