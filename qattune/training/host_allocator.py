"""Keep freed host memory inside the process while training on a CPU (glibc's malloc).

By default glibc serves large allocations (always those over 32 MiB: a step's logits, their gradient,
an embedding's gradient, a fake-quantized output head) with a fresh `mmap` and hands them back to the
kernel on `free`, and it gives the free top of its heap back too, so every step page-faults through the
same memory again: 10-15% of a CPU training step's time, float or QAT (`scripts/bench_train.py
--cpu-allocator`, docs/benchmarks.md). `keep_freed_host_memory` turns both off with `mallopt`, so freed
memory is reused: the resident set stays at the run's peak instead of falling between steps.

Set `QATTUNE_CPU_ALLOCATOR=default` to leave the allocator as it is. Elsewhere than glibc on Linux
(macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

ENV_VAR = "QATTUNE_CPU_ALLOCATOR"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt's int takes


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and never trim it; returns whether it
    took effect (False when turned off by `QATTUNE_CPU_ALLOCATOR=default` or not on glibc)."""
    if os.environ.get(ENV_VAR, "keep_freed") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    if applied:
        logger.info("host allocator: freed memory is kept for reuse (%s=default turns this off)", ENV_VAR)
    return applied
