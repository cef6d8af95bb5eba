"""Profile one training step of `bench_train.py`'s variants: top operators by time, and memory.

    python scripts/profile_train_step.py [--device cuda] [--variants plain qat/8da4w] [--rows 25] [--warmup 4] [--out DIR]

For each variant (same model, batch and shapes as `bench_train.py`): `--warmup` untimed steps (4: on a
CPU the first three still page-fault through memory the heap has not held yet, which inflates the large
tensors' operators several times over, e.g. the loss's log-softmax backward), then one step
with memory figures (allocated after the forward, peak of the step; CUDA only), then one step under
`torch.profiler`, whose operator table (sorted by self device time on CUDA, self CPU time on CPU or with
`--sort cpu`: where launch overhead starves the GPU) is printed and, with `--out`, written to
`DIR/profile_<sort>_<variant>.txt` (`<sort>`: `device` or `cpu` as `--sort`; `/` in the variant becomes `_`,
e.g. `DIR/profile_device_qat_8da4w.txt`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import bench_train
from _args import check_cuda, non_negative_int, positive_int
from qattune.quant.schemes import SCHEMES
from qattune.training.host_allocator import keep_freed_host_memory

_GIB = 1024**3


def memory_of_one_step(state: bench_train.TrainState, device: str) -> dict[str, float]:
    if device != "cuda":
        return {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logits = state.model(state.tokens)
    loss = state.loss_fn(logits, state.labels) / state.labels.numel()
    del logits
    after_forward = torch.cuda.memory_allocated()
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return {"allocated_before_gib": round(before / _GIB, 3), "saved_by_forward_gib": round((after_forward - before) / _GIB, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / _GIB, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    every_variant = bench_train.all_variants(list(SCHEMES), with_torchao=True, recompute_schemes=list(SCHEMES))
    parser.add_argument("--variants", nargs="+", default=["plain", "qat/8da4w"], choices=list(every_variant),
                        metavar="VARIANT", help=f"of: {', '.join(every_variant)}")
    parser.add_argument("--rows", type=positive_int, default=25)
    parser.add_argument("--warmup", type=non_negative_int, default=4, help="untimed steps before the profiled one")
    parser.add_argument("--sort", choices=["device", "cpu"], default="device",
                        help="order operators by self device time (CPU time on CPU) or by self CPU time")
    parser.add_argument("--out", default=None, metavar="DIR", help="also write each variant's table here")
    args = parser.parse_args()
    check_cuda(parser, "--device", [args.device])
    if "torchao/8da4w" in args.variants and not bench_train.torchao_available():
        parser.error("--variants torchao/8da4w: torchao is not installed or does not load with this torch "
                     f"({torch.__version__}); install torchao or leave that variant out")
    if args.out:
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            parser.error(f"--out {args.out}: cannot create the folder ({err.strerror}); write elsewhere")
    shape = bench_train.DEFAULT_SHAPES[args.device]
    schemes = sorted({v.split("/")[1] for v in args.variants if "/" in v})
    variants = bench_train.all_variants(schemes, with_torchao="torchao/8da4w" in args.variants,
                                        recompute_schemes=schemes)
    torch.manual_seed(1)
    batch = [torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len), device=args.device) for _ in range(2)]
    sort_key = "self_cuda_time_total" if args.device == "cuda" and args.sort == "device" else "self_cpu_time_total"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    if args.device == "cpu":
        keep_freed_host_memory()  # as bench_train.py and the training recipes run on CPU
    summary = {}
    for name in args.variants:
        state = bench_train.TrainState(variants[name](bench_train.build_float_model(shape, args.device)), *batch)
        for _ in range(args.warmup):
            state.step()
        summary[name] = memory_of_one_step(state, args.device)
        with profile(activities=activities) as prof:
            state.step()
        table = prof.key_averages().table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=60)
        print(f"== {name} {json.dumps(summary[name])}\n{table}")
        if args.out:
            Path(args.out, f"profile_{args.sort}_{name.replace('/', '_')}.txt").write_text(table)
        del state
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({"model": asdict(shape), "memory": summary}, indent=1))


if __name__ == "__main__":
    main()
