"""How much of the PTQ quality loss QAT recovers, measured honestly; prints JSON.

    python scripts/bench_quality.py [--steps 120] [--schemes 8da4w q4_0] [--eval-documents 5]

Same base model (SmolLM2-135M-Instruct, offline), same data (CPython docs, train split), same number of
steps and tokens for every run, evaluated on held-out topics the training never saw:

- bf16: a float fine-tune; ptq: that fine-tune quantized after training;
- qat_plain: straight-through QAT, float for the first half of the steps, fake-quantized for the second;
- qat_distill: QAT distilled from the frozen float starting model (float for the first third).

Every stage is a `qattune run` of the shipped recipes and configs, so the numbers are what users get.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qattune.cli.run import run_command


def _scheme_overrides(scheme: str) -> list[str]:
    """Quantizer overrides of the shipped configs (8da4w group 32) for `scheme`."""
    return [] if scheme == "8da4w" else [f"quantizer.scheme={scheme}", "~quantizer.group_size"]


def _train(out: Path, recipe: str, config: str, steps: int, extra: list[str]) -> Path:
    run_command([recipe, "--config", config, f"output_dir={out}", f"max_steps_per_epoch={steps}",
                 "run_val_every_n_steps=null", "progress_bar=false", *extra])
    return out / f"step_{steps}"


def _quantize(checkpoint: Path, out: Path, scheme: str, ptq: bool) -> Path:
    kind = ["quantizer._component_=qattune.quant.PTQQuantizer"] if ptq else []
    run_command(["quantize", "--config", "quantization", f"checkpoint_dir={checkpoint}", f"output_dir={out}",
                 *_scheme_overrides(scheme), *kind])
    return out / "quantized"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--schemes", nargs="+", default=["8da4w", "q4_0"])
    parser.add_argument("--eval-documents", type=int, default=5)
    parser.add_argument("--output-dir", default="/tmp/qattune/bench_quality")
    args = parser.parse_args()
    root = Path(args.output_dir).resolve()
    started = time.perf_counter()

    bf16 = _train(root / "bf16", "full_finetune", "smollm2/135M_full", args.steps, [])
    results = {}
    for scheme in args.schemes:
        base = root / scheme
        ce = "loss={_component_: qattune.training.CrossEntropyLoss}"
        plain = _train(base / "qat_plain", "qat_distributed", "smollm2/135M_qat_full", args.steps,
                       [ce, f"fake_quant_after_n_steps={args.steps // 2}", *_scheme_overrides(scheme)])
        distill = _train(base / "qat_distill", "qat_distributed", "smollm2/135M_qat_full", args.steps,
                         [f"fake_quant_after_n_steps={args.steps // 3}", *_scheme_overrides(scheme)])
        checkpoints = {
            "bf16": bf16,
            "ptq": _quantize(bf16, base / "ptq", scheme, ptq=True),
            "qat_plain": _quantize(plain, base / "qat_plain", scheme, ptq=False),
            "qat_distill": _quantize(distill, base / "qat_distill", scheme, ptq=False),
        }
        listed = ", ".join(f"{name}: {path}" for name, path in checkpoints.items())
        run_command(["eval", "--config", "eval", f"output_dir={base}/eval", "~checkpoint_dir",
                     f"checkpoints={{{listed}}}", f"perplexity.max_documents={args.eval_documents}"])
        results[scheme] = json.loads((base / "eval" / "eval_results.json").read_text())
    report = {
        "benchmark": "quality",
        "model": "SmolLM2-135M-Instruct",
        "data": "python_docs train split; evaluated on held-out validation topics",
        "steps": args.steps,
        "eval_documents": args.eval_documents,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "results": {scheme: {"perplexity": {n: m["perplexity"] for n, m in r["checkpoints"].items()},
                             "recovered_share": {n: s["perplexity"] for n, s in r["recovered_share"].items()}}
                    for scheme, r in results.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
