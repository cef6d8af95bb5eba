"""Benchmark fake quantization: one Linear layer's forward+backward per scheme, with and without fake
quantization, eager and torch.compile'd, on CPU and (when present) CUDA. Prints JSON.

Per scheme and device it times, interleaved round-robin so machine noise hits all variants alike:
- `float`: plain nn.Linear;
- `fake_quant_new_weight`: fake-quantized Linear whose weight changed since the last call (one micro-batch
  per optimizer step: the weight is fake-quantized again every iteration);
- `fake_quant_cached`: the same layer between optimizer steps (gradient accumulation, activation
  checkpointing recomputes, evaluation): the cached fake-quantized weight is reused;
- the same three under torch.compile (`--compile`).
Ratios are float time / variant time (1.0 = as fast as float; the product goal is >= 0.9 on GPU).

Usage: python scripts/bench_fake_quant.py [--devices cpu cuda] [--schemes 8da4w fp8] [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from _args import check_cuda, check_widths, non_negative_int, positive_int, scheme_block_size
from qattune.quant import QATQuantizer
from qattune.quant.schemes import SCHEMES

DEFAULT_SHAPES = {"cpu": (1024, 1024, 512), "cuda": (4096, 4096, 8192)}  # in, out, tokens


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step_fn(model: nn.Module, runner: Callable, x: torch.Tensor, grad: torch.Tensor,
             new_weight: bool) -> Callable[[], None]:
    """One forward+backward of `runner` (the model or its compiled wrapper)."""
    weight = model[0].weight

    def step() -> None:
        if new_weight:
            with torch.no_grad():
                weight.add_(0.0)  # an in-place update, as an optimizer step: invalidates the cache
        runner(x).backward(grad)
        weight.grad = None
        x.grad = None

    return step


def _group_size(scheme: str) -> int | None:
    """The group size the benchmark gives `scheme` (4w: 128; the others their default)."""
    return 128 if scheme == "4w" else None


def _build(scheme: str, in_features: int, out_features: int, device: str, dtype: torch.dtype) -> nn.Module:
    """A one-Linear model, prepared for `scheme` (its root forward pre-hook keeps the weight cache current)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype))
    if scheme != "float":
        QATQuantizer(scheme, group_size=_group_size(scheme), quantize_output=True).prepare(model)
    return model


def bench_device(device: str, schemes: list[str], shape: tuple[int, int, int], dtype: torch.dtype,
                 iters: int, warmup: int, compile_: bool) -> dict:
    in_features, out_features, tokens = shape
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_features, device=device, dtype=dtype)
    variants: dict[str, Callable[[], None]] = {}
    for scheme in ["float", *schemes]:
        for compiled in ([False, True] if compile_ else [False]):
            layer = _build(scheme, in_features, out_features, device, dtype)
            runner = torch.compile(layer) if compiled else layer
            suffix = "_compiled" if compiled else ""
            if scheme == "float":
                variants[f"float{suffix}"] = _step_fn(layer, runner, x, grad, new_weight=False)
                continue
            variants[f"{scheme}/fake_quant_new_weight{suffix}"] = _step_fn(layer, runner, x, grad, new_weight=True)
            variants[f"{scheme}/fake_quant_cached{suffix}"] = _step_fn(layer, runner, x, grad, new_weight=False)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(iters):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    median_ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    results: dict[str, dict] = {}
    for name, ms in median_ms.items():
        scheme, _, variant = name.rpartition("/")
        compiled = variant.endswith("_compiled")
        baseline = median_ms["float_compiled" if compiled else "float"]
        entry = results.setdefault(scheme or "float", {})
        entry[f"{variant}_ms"] = round(ms, 3)
        if scheme:
            entry[f"{variant}_vs_float"] = round(baseline / ms, 3)
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "in_features": in_features,
            "out_features": out_features, "tokens": tokens, "iters": iters, "results": results}


def main() -> None:
    # every scheme compiles the same forward code with another format: allow one graph per variant
    torch._dynamo.config.recompile_limit = 64
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
                        choices=list(DEFAULT_SHAPES))
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    parser.add_argument("--iters", type=positive_int, default=10)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--shape", type=positive_int, nargs=3, metavar=("IN", "OUT", "TOKENS"),
                        help="layer and batch size (default: 1024 1024 512 on CPU, 4096 4096 8192 on CUDA)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    args = parser.parse_args()
    check_cuda(parser, "--devices", args.devices)
    blocks = {scheme: scheme_block_size(scheme, _group_size(scheme)) for scheme in args.schemes}
    for device in args.devices:
        in_features = (args.shape or DEFAULT_SHAPES[device])[0]
        check_widths(parser, {"--shape IN": in_features}, blocks)
    report = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
              "runs": []}
    for device in args.devices:
        dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
        shape = tuple(args.shape) if args.shape else DEFAULT_SHAPES[device]
        report["runs"].append(bench_device(device, args.schemes, shape, dtype, args.iters, args.warmup, args.compile))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
