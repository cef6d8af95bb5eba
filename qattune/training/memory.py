"""Peak memory where the device reports it; nothing (and no error) where it does not."""

from __future__ import annotations

import sys

import torch

_GIB = 1024**3


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak measurement on devices that track one."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_stats(device: torch.device) -> dict[str, float]:
    """`peak_memory_alloc_gib`/`peak_memory_reserved_gib` on CUDA, `memory_alloc_gib` on MPS,
    the process's peak resident set `peak_rss_gib` on CPU (Linux/macOS), else {}."""
    if device.type == "cuda":
        return {
            "peak_memory_alloc_gib": torch.cuda.max_memory_allocated(device) / _GIB,
            "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / _GIB,
        }
    if device.type == "mps":
        return {"memory_alloc_gib": torch.mps.current_allocated_memory() / _GIB}
    try:
        import resource
    except ImportError:
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_gib": peak / _GIB if sys.platform == "darwin" else peak * 1024 / _GIB}
