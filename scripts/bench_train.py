"""Benchmark a full training step (forward, backward, AdamW step, zero_grad): plain float vs QAT per
scheme vs QAT+LoRA vs torchao's 8da4w QAT, on one model and batch, in one interleaved run. Prints JSON.

Variants (each also per-block `torch.compile`d with `--modes eager compile`):
- `plain`: the float model, full fine-tuning;
- `qat/<scheme>`: `QATQuantizer(<scheme>).prepare(model)` with the scheme's defaults (8da4w: group 32);
- `qat_recompute/<scheme>` (by default 8da4w and 4w; any scheme when named in `--variants`):
  `QATQuantizer(<scheme>, recompute_weights=True)`, which keeps no fake-quantized weight copy and
  re-quantizes in the backward (less memory, more work);
- `qat_lowmem/<scheme>` (schemes with activations, by default 8da4w; any when named): as `qat_recompute`,
  plus `recompute_activations=True` (the float inputs kept for the backward, as float training keeps
  them, and quantized again there);
- `qat_lora/8da4w`: the 8da4w-prepared model with rank-8 LoRA on q/k/v/o and the MLP (frozen base);
- `torchao/8da4w`: torchao's `Int8DynActInt4WeightQATQuantizer(groupsize=32)` (what torchtune's QAT
  recipe runs), when torchao is installed.

Method. Round-robin over the variants for `--rounds` rounds (the machine's noise then hits every variant
alike), after one untimed round (compilation, first-step allocations). Each visit builds the variant
afresh from the same seed (so only one model lives at a time), runs `--warmup` untimed steps, then
`--steps` timed steps; tokens/s is batch*seq over the median step time of all rounds, and
`ratio_to_plain` divides by `plain` in the same mode. Under load from other processes the
wall-clock samples spread widely, so the JSON also gives the ratio of the fastest steps
(`ratio_to_plain_best_step`, the least disturbed) and of the process CPU time per step
(`ratio_to_plain_cpu_time`). Peak memory per variant: on CUDA
`max_memory_allocated` from the build through the untimed steps; on CPU the process's peak resident set
over the same span (a sampler thread; freed memory is returned to the OS before each visit), also given
above the process's resident set before the build. On CPU the host allocator is set as the training
recipes set it (`qattune.training.host_allocator`: freed memory kept for reuse; `--cpu-allocator
default` leaves glibc as it comes, for comparison).

Defaults: CPU: fp32, a 4-layer width-512 Llama (8 heads, 8 kv heads, MLP 1536, vocab 32000), seq 256,
batch 4. CUDA: bf16, Llama-3.2-1B sizes with random weights, seq 2048, batch 4.

Usage: python scripts/bench_train.py [--device cpu] [--modes eager compile] [--rounds 5]
                                     [--variants plain qat/8da4w torchao/8da4w] [--out bench.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from _args import check_cuda, check_widths, non_negative_int, positive_int, scheme_block_size
from qattune.models import apply_lora, llama
from qattune.quant import QATQuantizer
from qattune.quant.schemes import SCHEMES
from qattune.training import AdamW, CrossEntropyLoss, compile_blocks
from qattune.training.host_allocator import ENV_VAR, keep_freed_host_memory

_GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """The benchmarked Llama's sizes and the batch."""

    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_dim: int
    vocab_size: int
    seq_len: int
    batch_size: int
    dtype: str


DTYPES = ("float32", "bfloat16", "float16")

DEFAULT_SHAPES = {
    "cpu": ModelShape(4, 512, 8, 8, 1536, 32_000, 256, 4, "float32"),
    "cuda": ModelShape(16, 2048, 32, 8, 8192, 128_256, 2048, 4, "bfloat16"),  # Llama 3.2 1B
}


# -- variants -------------------------------------------------------------------------------------------

def build_float_model(shape: ModelShape, device: str) -> nn.Module:
    """The float Llama, same weights for every variant (seed 0)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = llama(shape.vocab_size, shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.embed_dim,
                      shape.intermediate_dim, max_seq_len=shape.seq_len)
    model.init_weights()
    return model.to(getattr(torch, shape.dtype))


def _qattune_qat(scheme: str) -> Callable[[nn.Module], nn.Module]:
    return lambda model: QATQuantizer(scheme).prepare(model)


def _qattune_qat_recompute(scheme: str) -> Callable[[nn.Module], nn.Module]:
    return lambda model: QATQuantizer(scheme, recompute_weights=True).prepare(model)


def _qattune_qat_lowmem(scheme: str) -> Callable[[nn.Module], nn.Module]:
    return lambda model: QATQuantizer(scheme, recompute_weights=True, recompute_activations=True).prepare(model)


def _qattune_qat_lora(model: nn.Module) -> nn.Module:
    QATQuantizer("8da4w").prepare(model)
    return apply_lora(model, lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
                      apply_lora_to_mlp=True, lora_rank=8, lora_alpha=16.0)


def _torchao_8da4w(model: nn.Module) -> nn.Module:
    from torchao.quantization.qat import Int8DynActInt4WeightQATQuantizer

    precision = next(model.parameters()).dtype
    return Int8DynActInt4WeightQATQuantizer(groupsize=32, precision=precision, scales_precision=precision
                                            ).prepare(model)


def torchao_available() -> bool:
    try:
        import torchao.quantization.qat  # noqa: F401
    except Exception:  # torchao absent, or it does not load with this torch
        return False
    return True


DEFAULT_RECOMPUTE_SCHEMES = ("8da4w", "4w")  # the others' `qat_recompute/<scheme>` run when named


def all_variants(schemes: list[str], with_torchao: bool, recompute_schemes: Sequence[str] = DEFAULT_RECOMPUTE_SCHEMES
                 ) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Variant name -> transform of the float model."""
    variants: dict[str, Callable[[nn.Module], nn.Module]] = {"plain": lambda model: model}
    variants.update({f"qat/{scheme}": _qattune_qat(scheme) for scheme in schemes})
    variants.update({f"qat_recompute/{scheme}": _qattune_qat_recompute(scheme)
                     for scheme in recompute_schemes if scheme in schemes})
    variants.update({f"qat_lowmem/{scheme}": _qattune_qat_lowmem(scheme)
                     for scheme in recompute_schemes if scheme in schemes and SCHEMES[scheme].activation is not None})
    variants["qat_lora/8da4w"] = _qattune_qat_lora
    if with_torchao:
        variants["torchao/8da4w"] = _torchao_8da4w
    return variants


# -- one training step ----------------------------------------------------------------------------------

class TrainState:
    """A built variant: model, optimizer and the step function."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        self.model = model
        self.optimizer = AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        self.loss_fn = CrossEntropyLoss()
        self.tokens, self.labels = tokens, labels

    def step(self) -> float:
        logits = self.model(self.tokens)
        loss = self.loss_fn(logits, self.labels) / self.labels.numel()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # also waits for the device


# -- memory ---------------------------------------------------------------------------------------------

def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _return_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class PeakRSS:
    """Samples the process's resident set in a thread while active (CPU peak memory)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _current_rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.peak = _current_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss())


# -- the run --------------------------------------------------------------------------------------------

@dataclass
class Sample:
    step_s: list[float]
    cpu_s: list[float]
    peak_memory_gib: Optional[float] = None
    memory_above_baseline_gib: Optional[float] = None


def visit(name: str, transform: Callable[[nn.Module], nn.Module], compiled: bool, shape: ModelShape, device: str,
          batch: tuple[torch.Tensor, torch.Tensor], warmup: int, steps: int, measure_memory: bool) -> Sample:
    """Build one variant, run `warmup` untimed and `steps` timed training steps, free it."""
    _return_freed_memory()
    baseline = _current_rss() if device == "cpu" else 0
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sampler = PeakRSS() if device == "cpu" and measure_memory else None
    if sampler is not None:
        sampler.__enter__()
    model = transform(build_float_model(shape, device))
    if compiled:
        compile_blocks(model)
    state = TrainState(model, *batch)
    for _ in range(warmup):
        state.step()
    sample = Sample(step_s=[], cpu_s=[])
    if sampler is not None:
        sampler.__exit__()
        sample.peak_memory_gib = sampler.peak / _GIB
        sample.memory_above_baseline_gib = (sampler.peak - baseline) / _GIB
    elif device == "cuda" and measure_memory:
        sample.peak_memory_gib = torch.cuda.max_memory_allocated() / _GIB
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        state.step()
        sample.step_s.append(time.perf_counter() - start)
        sample.cpu_s.append(time.process_time() - cpu_start)
    del state, model
    return sample


def run(shape: ModelShape, device: str, variants: dict[str, Callable], modes: list[str], rounds: int,
        warmup: int, steps: int) -> dict:
    torch.manual_seed(1)
    tokens = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len), device=device)
    labels = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len), device=device)
    jobs = [(f"{name}{'+compile' if mode == 'compile' else ''}", name, mode == "compile")
            for mode in modes for name in variants]
    step_s: dict[str, list[float]] = {label: [] for label, _, _ in jobs}
    cpu_s: dict[str, list[float]] = {label: [] for label, _, _ in jobs}
    memory: dict[str, Sample] = {}
    for round_index in range(rounds + 1):  # round 0: untimed (compilation, first allocations), memory
        order = jobs[round_index % len(jobs):] + jobs[:round_index % len(jobs)]
        for label, name, compiled in order:
            sample = visit(name, variants[name], compiled, shape, device, (tokens, labels),
                           warmup=warmup, steps=0 if round_index == 0 else steps,
                           measure_memory=round_index == 0)
            if round_index == 0:
                memory[label] = sample
            step_s[label].extend(sample.step_s)
            cpu_s[label].extend(sample.cpu_s)
    tokens_per_step = shape.batch_size * shape.seq_len
    results = {}
    for label, name, compiled in jobs:
        plain_label = "plain+compile" if compiled else "plain"
        median, plain = statistics.median(step_s[label]), statistics.median(step_s[plain_label])
        cpu, plain_cpu = statistics.median(cpu_s[label]), statistics.median(cpu_s[plain_label])
        results[label] = {
            "tokens_per_s": round(tokens_per_step / median, 1),
            "ratio_to_plain": round(plain / median, 3),
            "ratio_to_plain_best_step": round(min(step_s[plain_label]) / min(step_s[label]), 3),
            "ratio_to_plain_cpu_time": round(plain_cpu / cpu, 3),
            "step_s_median": round(median, 4),
            "step_s_min": round(min(step_s[label]), 4),
            "step_s_max": round(max(step_s[label]), 4),
            "cpu_s_median": round(cpu, 4),
            "peak_memory_gib": _round(memory[label].peak_memory_gib),
            "memory_above_baseline_gib": _round(memory[label].memory_above_baseline_gib),
        }
    return results


def check_shape(parser: argparse.ArgumentParser, shape: ModelShape) -> None:
    """Refuse sizes the Llama cannot be built with (as `TransformerConfig` would, but naming the options)."""
    if shape.embed_dim % shape.num_heads:
        parser.error(f"--embed-dim {shape.embed_dim}: must be a multiple of --num-heads {shape.num_heads} "
                     f"(each head gets embed_dim / num_heads channels)")
    if shape.num_heads % shape.num_kv_heads:
        parser.error(f"--num-heads {shape.num_heads}: must be a multiple of --num-kv-heads {shape.num_kv_heads} "
                     f"(grouped-query attention shares each kv head among num_heads / num_kv_heads heads)")
    if (shape.embed_dim // shape.num_heads) % 2:
        parser.error(f"--embed-dim {shape.embed_dim} / --num-heads {shape.num_heads} = head size "
                     f"{shape.embed_dim // shape.num_heads}: must be even (rotary embeddings rotate pairs)")


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)


def _load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--variants", nargs="+", default=None,
                        help="only these variant names (e.g. plain qat/8da4w torchao/8da4w)")
    parser.add_argument("--no-torchao", action="store_true", help="leave out torchao's 8da4w QAT")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--steps", type=positive_int, default=1, help="timed steps per visit")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps per visit")
    for field_name, field_type in ModelShape.__annotations__.items():
        if field_type == "int":
            parser.add_argument(f"--{field_name.replace('_', '-')}", type=positive_int, default=None,
                                help="override the device's default model/batch size")
        else:
            parser.add_argument(f"--{field_name}", choices=DTYPES, default=None,
                                help="override the device's default dtype")
    parser.add_argument("--cpu-allocator", choices=["keep_freed", "default"], default="keep_freed",
                        help="on CPU: glibc malloc as the training recipes set it (keep_freed: "
                             "qattune.training.host_allocator) or as it comes")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    check_cuda(parser, "--device", [args.device])
    shape_fields = asdict(DEFAULT_SHAPES[args.device])
    shape_fields.update({k: v for k, v in vars(args).items() if k in shape_fields and v is not None})
    shape = ModelShape(**shape_fields)
    check_shape(parser, shape)
    variants = all_variants(args.schemes, torchao_available() and not args.no_torchao,
                            args.schemes if args.variants else DEFAULT_RECOMPUTE_SCHEMES)
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(variants)}")
        variants = {name: fn for name, fn in variants.items() if name in args.variants or name == "plain"}
    schemes = sorted({name.split("/")[1] for name in variants if "/" in name})
    check_widths(parser, {"--embed-dim": shape.embed_dim, "--intermediate-dim": shape.intermediate_dim},
                 {scheme: scheme_block_size(scheme) for scheme in schemes}, "--schemes/--variants")
    cpu_allocator = "n/a"
    if args.device == "cpu":
        os.environ[ENV_VAR] = args.cpu_allocator
        cpu_allocator = "keep_freed" if keep_freed_host_memory() else "default"

    torch._dynamo.config.recompile_limit = 64  # one graph per variant's block
    load_before = _load_average()
    start = time.time()
    results = run(shape, args.device, variants, args.modes, args.rounds, args.warmup, args.steps)
    report = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "cpu_allocator": cpu_allocator,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "wall_s": round(time.time() - start, 1),
        "model": asdict(shape),
        "rounds": args.rounds,
        "timed_steps_per_visit": args.steps,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
