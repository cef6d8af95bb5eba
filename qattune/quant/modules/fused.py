"""Fused fake quantization for eager training: each format's `fake_quantize_with_mask`, torch.compile'd.

In eager mode a format's quantize-dequantize runs as eight to fifteen separate elementwise passes, each
writing a fresh full-size float32 temporary (`x / scale`, `round`, `clamp`, `== `, `* scale`, ...); on a
CPU that costs more than the matmul it feeds. Compiled, it is one or two loops that read the input and
write the fake-quantized value and the not-clipped mask. The numbers are the same: the tests in
`tests/quant/test_perf_fused.py` compare every scheme's compiled result with the eager one bit for bit.

Used for tensors of at least `FUSE_MIN_NUMEL` elements (weights at the once-per-optimizer-step cache
refresh, activations in the straight-through estimator's forward), outside torch.compile (inside it the
outer graph fuses the same code). One compiled function per format configuration; the tensor is seen as 2-D
`[rows, width]` with the row count dynamic and the width static (a static width keeps the inner block
loops vectorized; fully dynamic shapes ran about 2x slower), so a format compiles once per distinct
width and the compile cost (a few seconds on a CPU) is paid once per process. If compiling fails (no C++
compiler, an unsupported platform), a warning is logged once and that format stays eager.
Turn it off with `set_fused_fake_quant(False)` or the environment variable `QATTUNE_FUSED_FAKE_QUANT=0`.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Callable, Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

FUSE_MIN_NUMEL = 1 << 16  # smaller tensors: the eager passes are cheap and compiling would not pay
_FUSED_DEVICES = ("cpu", "cuda")

_enabled = os.environ.get("QATTUNE_FUSED_FAKE_QUANT", "1") != "0"
_compiled: dict[str, Callable] = {}
_failed: set[type] = set()


def set_fused_fake_quant(enabled: bool) -> None:
    """Turn the compiled fake-quantization path on or off for this process."""
    global _enabled
    _enabled = enabled


def fused_fake_quant_enabled() -> bool:
    """Whether large tensors take the compiled path."""
    return _enabled


def _wants_fused(fmt: object, x: Tensor) -> bool:
    return (
        _enabled
        and type(fmt) not in _failed
        and x.numel() >= FUSE_MIN_NUMEL
        and x.dim() >= 1
        and x.device.type in _FUSED_DEVICES
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def _fake_quantize_bytes(fmt, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The compiled body: the mask comes out as uint8 0/1 (a bool store from inductor's CPU kernels ran
    about 2.5x slower than the whole quantize-dequantize; the caller views the bytes as bool)."""
    x_hat, in_range = fmt.fake_quantize_with_mask(x)
    return x_hat, None if in_range is None else in_range.float().to(torch.int32).to(torch.uint8)


def _compiled_for(fmt: object) -> Callable:
    """One compiled function per format configuration, each with its own code object, so torch.compile's
    per-function recompile limit counts only that format's widths and dtypes."""
    key = repr(fmt)
    if key not in _compiled:
        body = _fake_quantize_bytes
        code = body.__code__.replace(co_name=f"fake_quantize_{type(fmt).__name__}_{len(_compiled)}")
        function = types.FunctionType(code, body.__globals__, code.co_name)
        _compiled[key] = torch.compile(function, dynamic=False)
    return _compiled[key]


def fake_quantize_with_mask(fmt, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """`fmt.fake_quantize_with_mask(x)` (forward value, not-clipped mask or None), compiled for large
    tensors when grad mode is off (as in the STE's forward and the weight-cache refresh)."""
    if not _wants_fused(fmt, x):
        return fmt.fake_quantize_with_mask(x)
    rows = x.reshape(-1, x.shape[-1])
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    try:
        x_hat, in_range = _compiled_for(fmt)(fmt, rows)
    except Exception as error:  # compile unavailable here: stay eager for this format
        _failed.add(type(fmt))
        logger.warning("fused fake quantization unavailable for %s (%s: %s); using the eager path",
                       type(fmt).__name__, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return fmt.fake_quantize_with_mask(x)
    mask = None if in_range is None else in_range.view(torch.bool).reshape(x.shape)
    return x_hat.reshape(x.shape), mask
