"""Fused fake quantization for eager training: each format's `fake_quantize_with_mask`, torch.compile'd.

In eager mode a format's quantize-dequantize runs as eight to fifteen separate elementwise passes, each
writing a fresh full-size float32 temporary (`x / scale`, `round`, `clamp`, `== `, `* scale`, ...); on a
CPU that costs more than the matmul it feeds. Compiled, it is one or two loops that read the input and
write the fake-quantized value and the clipped mask. The numbers are the same: the tests in
`tests/quant/test_perf_fused.py` compare every scheme's compiled result with the eager one bit for bit.

Used for tensors of at least `FUSE_MIN_NUMEL` elements (weights at the once-per-optimizer-step cache
refresh, in place into the cache's buffers; activations in the straight-through estimator's forward),
outside torch.compile (inside it the outer graph fuses the same code). One compiled function per format
configuration; the tensor is seen as 2-D `[rows, width]` with the row count dynamic and the width static
(a static width keeps the inner block loops vectorized; fully dynamic shapes ran about 2x slower), so a
format compiles once per distinct width and the compile cost (a few seconds on a CPU) is paid once per
process. If compiling fails (no C++ compiler, an unsupported platform), a warning is logged once and that
format stays eager.
Turn it off with `set_fused_fake_quant(False)` or the environment variable `QATTUNE_FUSED_FAKE_QUANT=0`.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Callable, Optional

import torch
from torch import Tensor

from qattune.quant.modules.direct_call import DirectCompiled

logger = logging.getLogger(__name__)

FUSE_MIN_NUMEL = 1 << 16  # smaller tensors: the eager passes are cheap and compiling would not pay
_FUSED_DEVICES = ("cpu", "cuda")

_enabled = os.environ.get("QATTUNE_FUSED_FAKE_QUANT", "1") != "0"
_direct_calls = os.environ.get("QATTUNE_DIRECT_COMPILED", "1") != "0"
_compiled: dict[str, Callable] = {}
_failed: set[type] = set()


def set_fused_fake_quant(enabled: bool) -> None:
    """Turn the compiled fake-quantization path on or off for this process."""
    global _enabled
    _enabled = enabled


def fused_fake_quant_enabled() -> bool:
    """Whether large tensors take the compiled path."""
    return _enabled


def fusable(fmt: object, x: Tensor) -> bool:
    """Whether `fmt`'s fake quantization of `x` takes the compiled path here (large enough, grad mode
    off, not already inside torch.compile, compiling not failed for this format)."""
    return (
        _enabled
        and type(fmt) not in _failed
        and x.numel() >= FUSE_MIN_NUMEL
        and x.dim() >= 1
        and x.device.type in _FUSED_DEVICES
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def _clipped_bytes(in_range: Tensor) -> Tensor:
    """The clipped mask as uint8 0/1 (a bool store from inductor's CPU kernels ran about 2.5x slower than
    the whole quantize-dequantize; the caller views the bytes as bool)."""
    return in_range.logical_not().float().to(torch.int32).to(torch.uint8)


def _fake_quantize_bytes(fmt, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The compiled body: the fake-quantized value and the clipped mask as bytes."""
    x_hat, in_range = fmt.fake_quantize_with_mask(x)
    return x_hat, None if in_range is None else _clipped_bytes(in_range)


def _fake_quantize_into(fmt, x: Tensor, out: Tensor, clipped: Optional[Tensor]) -> None:
    """The compiled in-place body: the fake-quantized value into `out`, the clipped mask into `clipped`
    (uint8 0/1). Writing into buffers kept from the last call spares a fresh allocation (on a CPU, page
    faults on every first touch) and halves the time of a large weight's refresh."""
    x_hat, in_range = fmt.fake_quantize_with_mask(x)
    out.copy_(x_hat)
    if clipped is not None:
        clipped.copy_(_clipped_bytes(in_range))


def _fake_quantize_many_into(fmt, xs: list[Tensor], outs: list[Tensor], clippeds: list) -> None:
    """`_fake_quantize_into` for several tensors in one compiled call (one graph, one launch from Python)."""
    for x, out, clipped in zip(xs, outs, clippeds):
        _fake_quantize_into(fmt, x, out, clipped)


def _compiled_for(fmt: object, body: Callable = _fake_quantize_bytes) -> Callable:
    """One compiled function per format configuration and body, each with its own code object, so
    torch.compile's per-function recompile limit counts only that format's widths and dtypes. The
    functional body's repeated calls skip Dynamo (`direct_call`; `QATTUNE_DIRECT_COMPILED=0`: never)."""
    key = f"{body.__name__}:{fmt!r}"
    if key not in _compiled:
        code = body.__code__.replace(co_name=f"{body.__name__.lstrip('_')}_{type(fmt).__name__}_{len(_compiled)}")
        function = types.FunctionType(code, body.__globals__, code.co_name)
        direct = body is _fake_quantize_bytes and _direct_calls
        _compiled[key] = DirectCompiled(function) if direct else torch.compile(function, dynamic=False)
    return _compiled[key]


def _compile_failed(fmt: object, error: Exception) -> None:
    _failed.add(type(fmt))
    logger.warning("fused fake quantization unavailable for %s (%s: %s); using the eager path",
                   type(fmt).__name__, type(error).__name__, str(error).splitlines()[0] if str(error) else "")


def _eager_clipped(fmt, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    x_hat, in_range = fmt.fake_quantize_with_mask(x)
    return x_hat, None if in_range is None else in_range.logical_not()


def fake_quantize_clipped(fmt, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """`fmt`'s fake quantization of `x` and the mask of the elements it clipped (bool; the negation of
    `fmt.fake_quantize_with_mask`'s, None for a format that never clips), compiled for large tensors
    when grad mode is off (as in the STE's forward and the weight-cache refresh)."""
    if not fusable(fmt, x):
        return _eager_clipped(fmt, x)
    rows = x.reshape(-1, x.shape[-1])
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    try:
        x_hat, clipped = _compiled_for(fmt)(fmt, rows)
    except Exception as error:  # compile unavailable here: stay eager for this format
        _compile_failed(fmt, error)
        return _eager_clipped(fmt, x)
    if clipped is not None:
        clipped = clipped.view(torch.bool).reshape(x.shape)
    return x_hat.reshape(x.shape), clipped


def _in_place_applies(fmt, x: Tensor, out: Tensor, clipped: Optional[Tensor]) -> bool:
    return fusable(fmt, x) and out.is_contiguous() and (clipped is None or clipped.is_contiguous())


def _as_rows(x: Tensor, out: Tensor, clipped: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """`x`, `out` and `clipped` (as uint8) seen as `[rows, width]`."""
    rows = x.reshape(-1, x.shape[-1])
    return rows, out.view(rows.shape), None if clipped is None else clipped.view(torch.uint8).view(rows.shape)


def _run_compiled(fmt, body: Callable, *args) -> bool:
    """Run `fmt`'s compiled `body`; False (and that format eager from now on) if compiling fails."""
    try:
        _compiled_for(fmt, body)(fmt, *args)
    except Exception as error:
        _compile_failed(fmt, error)
        return False
    return True


def fake_quantize_into(fmt, x: Tensor, out: Tensor, clipped: Optional[Tensor]) -> bool:
    """Write what `fake_quantize_clipped` returns into `out` and `clipped` (None for a format that never
    clips), in one compiled in-place pass. Returns False, having written nothing, where the compiled path
    does not apply (small tensors, grad mode on, compile unavailable): the caller then computes eagerly."""
    if not _in_place_applies(fmt, x, out, clipped):
        return False
    views = _as_rows(x, out, clipped)
    for tensor in views:
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    return _run_compiled(fmt, _fake_quantize_into, *views)


def fake_quantize_many_into(fmt, xs: list[Tensor], outs: list[Tensor], clippeds: list) -> bool:
    """`fake_quantize_into` for several tensors of one format in a single compiled call, so a refresh of
    every weight after an optimizer step costs one call from Python rather than one per layer (on a GPU,
    where the host launches each layer's kernels, those calls leave the device waiting). The numbers are
    those of `fake_quantize_into`. Returns False, having written nothing, where the compiled path does not
    apply to every tensor. Row counts are dynamic and widths static: one graph per count and widths."""
    if not xs or not all(_in_place_applies(fmt, x, out, c) for x, out, c in zip(xs, outs, clippeds)):
        return False
    views = [_as_rows(x, out, clipped) for x, out, clipped in zip(xs, outs, clippeds)]
    for tensor in (t for view in views for t in view):
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    rows, out_rows, clipped_rows = ([view[i] for view in views] for i in range(3))
    return _run_compiled(fmt, _fake_quantize_many_into, rows, out_rows, clipped_rows)
