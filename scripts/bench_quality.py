"""How much of the PTQ quality loss QAT recovers, measured honestly; prints JSON.

    python scripts/bench_quality.py [--steps 120] [--schemes 8da4w q4_0] [--seeds 0 1 2] [--eval-documents 3 5]
                                    [--qat-override fake_quant_after_n_steps=60 ...]

Same base model (SmolLM2-135M-Instruct, offline), same data (CPython docs, train split), same optimizer,
learning rate and schedule, and the same number of steps and tokens for every run, evaluated on held-out
topics the training never saw (`--eval-documents`: the first N validation topics, once per N given; 3 is
the set the recorded figures used, mostly one 13.6k-character topic; 5 is the whole validation split,
about 42k characters). Each set's results also hold every topic's own perplexities and recovered shares
(`per_document`), and with several seeds the report gives each topic's mean share over them
(`recovered_share_per_topic_over_seeds`, from the largest set): where QAT wins back PTQ's loss, and
where it does not.

- bf16: a float fine-tune (`smollm2/135M_full`); ptq: that fine-tune quantized after training;
- qat_plain: the plain straight-through recipe, float for the first half of the steps, fake-quantized for
  the second, token cross entropy;
- qat: qattune's recipe (`smollm2/135M_qat_full`): a short float phase (the first tenth), then fake
  quantization, token cross entropy;
- qat_distill: the qat run distilled (kd_weight 0.5) from the float model as it was when fake
  quantization turned on (`teacher_snapshot: fake_quant_start`);
- qat_ranges: the qat run with learned weight scales (`quantizer.range_learning: true`) at 1/100 of
  the learning rate (`range_learning_lr`); schemes with an integer grid only (8da4w, q4_0), skipped
  for the others;
- qat_ranges_cover: qat_ranges with the scales starting at each group's smallest grid whose end codes
  hold its extremes (`quantizer.range_init: cover`) instead of the absmax scale, which clips each
  group's largest positive weight;
- qat_ranges_mse: qat_ranges with the scales starting at each group's least-squared-error clipping
  range (`quantizer.range_init: mse`) instead of its full range;
- qat_gptq: qattune's best measured recipe (`smollm2/135M_qat_gptq`): learned scales starting at the
  covering grid, and a float phase (its config's share of the steps: three quarters, for 8da4w and for
  q4_0's `smollm2/135M_qat_gptq_q4_0`) after which AWQ scales the blocks' channels
  (`quantizer.awq_scaling`) and GPTQ rounds their weights (`quantizer.rounding_init: gptq`, calibrated
  on the first training batches); one pass of block reconstruction then trains each block towards
  the float block's outputs (`quantizer.reconstruction_epochs`), and for 8da4w GPTQ rounds the output
  head too (`quantizer.gptq_output_head`), before fake-quantized training;
- ptq_gptq (with qat_gptq): the bf16 fine-tune quantized with the same AWQ scaling, GPTQ rounding and
  reconstruction (the same calibration, no training): how much of qat_gptq's gain they give without
  training.

Every stage is a `qattune run` of the shipped recipes and configs, so the numbers are what users get.
Their tables and logs go to stderr, so that stdout holds the JSON report alone; the runs' own files
(checkpoints, each `eval_results.json`) stay in `--output-dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from _args import positive_int
from qattune.cli.run import run_command
from qattune.demo import qat_float_phase

VARIANTS = ("qat_plain", "qat", "qat_distill", "qat_ranges", "qat_ranges_cover", "qat_ranges_mse", "qat_gptq")
RANGE_LEARNING_SCHEMES = ("8da4w", "8w", "8da8w", "q4_0")
RANGE_LEARNING = ["+quantizer.range_learning=true", "range_learning_lr=2e-6"]  # the configs' lr 2e-4 / 100
DISTILLATION = "loss={_component_: qattune.training.DistillationLoss, kd_weight: 0.5}"
# qat_gptq's recipe per scheme (the others: smollm2/135M_qat_gptq with the scheme overridden)
GPTQ_CONFIGS = {"q4_0": "smollm2/135M_qat_gptq_q4_0"}
# PTQ with GPTQ rounding calibrates on what qat_gptq calibrates on (the training set's first batches, as
# many as its config's quantizer.gptq_batches), with the same AWQ scaling first
GPTQ_PTQ = ["+quantizer.range_learning=true", "+quantizer.range_init=cover", "+quantizer.rounding_init=gptq",
            "+quantizer.awq_scaling=true", "batch_size=2",
            "+dataset={_component_: qattune.data.python_docs_dataset, split: train, max_seq_len: 128, packed: true}"]


def _gptq_config(scheme: str) -> str:
    return GPTQ_CONFIGS.get(scheme, "smollm2/135M_qat_gptq")


def _gptq_recipe(scheme: str):
    """qat_gptq's composed config for `scheme`."""
    from qattune.config.loader import load_config

    return load_config(_gptq_config(scheme))


def _gptq_ptq_overrides(scheme: str) -> list[str]:
    """ptq_gptq's quantizer: AWQ + GPTQ as qat_gptq's config sets them (calibration batches, output head,
    block reconstruction)."""
    quantizer = _gptq_recipe(scheme).quantizer
    head = ["+quantizer.gptq_output_head=true"] if quantizer.get("gptq_output_head", False) else []
    epochs = quantizer.get("reconstruction_epochs", 0)
    reconstruction = [f"+quantizer.reconstruction_epochs={epochs}"] if epochs else []
    return [*GPTQ_PTQ, f"+quantizer.gptq_batches={quantizer.gptq_batches}", *head, *reconstruction]


def _gptq_float_phase(scheme: str, steps: int) -> int:
    """qat_gptq's float phase for `steps` steps: the same share of the run as in its config."""
    return qat_float_phase(steps, _gptq_config(scheme))


def _scheme_overrides(scheme: str, options: list[str]) -> list[str]:
    """Quantizer overrides of the shipped configs (8da4w group 32) for `scheme`, plus `options`
    (`--quantizer-option key=value` pairs, given to every quantizer: PTQ, QAT training and conversion)."""
    added = [f"+quantizer.{option}" for option in options]
    return added if scheme == "8da4w" else [f"quantizer.scheme={scheme}", "~quantizer.group_size", *added]


def _variant_overrides(variant: str, steps: int, scheme: str) -> list[str]:
    """What each QAT variant changes in `smollm2/135M_qat_full` (qat_gptq: in its own config)."""
    if variant == "qat_gptq":  # its config holds the rest
        return [f"fake_quant_after_n_steps={_gptq_float_phase(scheme, steps)}"]
    if variant == "qat_plain":
        return [f"fake_quant_after_n_steps={steps // 2}"]
    recipe = [f"fake_quant_after_n_steps={max(1, steps // 10)}"]
    if variant == "qat":
        return recipe
    if variant == "qat_ranges":
        return recipe + RANGE_LEARNING
    if variant.startswith("qat_ranges_"):  # qat_ranges_<range_init>
        return recipe + RANGE_LEARNING + [f"+quantizer.range_init={variant.removeprefix('qat_ranges_')}"]
    return recipe + [DISTILLATION, "teacher_snapshot=fake_quant_start"]


def _overridden(overrides: Sequence[str], extra: Sequence[str]) -> list[str]:
    """`overrides` with `extra` (`--qat-override`) after them, less those of the keys `extra` sets."""
    keys = {option.split("=", 1)[0].lstrip("+~") for option in extra}
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keys] + list(extra)


def _train(out: Path, recipe: str, config: str, steps: int, extra: list[str], reuse: bool) -> Path:
    """Train (or, with `reuse`, keep a finished run's last checkpoint) and return the checkpoint."""
    checkpoint = out / f"step_{steps}"
    if not (reuse and (checkpoint / "recipe_state.pt").is_file()):
        run_command([recipe, "--config", config, f"output_dir={out}", f"max_steps_per_epoch={steps}",
                     "run_val_every_n_steps=null", "progress_bar=false", "overwrite_output_dir=true", *extra])
    return checkpoint


def _quantize(checkpoint: Path, out: Path, scheme: str, options: list[str], ptq: bool,
              extra: Sequence[str] = ()) -> Path:
    kind = ["quantizer._component_=qattune.quant.PTQQuantizer"] if ptq else []
    run_command(["quantize", "--config", "quantization", f"checkpoint_dir={checkpoint}", f"output_dir={out}",
                 *_scheme_overrides(scheme, options), *kind, *extra])
    return out / "quantized"


def _run_seed(root: Path, seed: int, args: argparse.Namespace, minutes: dict) -> dict:
    """Every scheme's eval results for one seed (the data order and initial randomness of every run), per
    held-out set (`--eval-documents`)."""
    seeded = [f"seed={seed}"]
    bf16 = _train(root / "bf16", "full_finetune", "smollm2/135M_full", args.steps, seeded, args.reuse)
    results = {}
    for scheme in args.schemes:
        base = root / scheme
        checkpoints = {"bf16": bf16, "ptq": _quantize(bf16, base / "ptq", scheme, args.quantizer_option, ptq=True)}
        if "qat_gptq" in args.variants and scheme in RANGE_LEARNING_SCHEMES:
            checkpoints["ptq_gptq"] = _quantize(bf16, base / "ptq_gptq", scheme, args.quantizer_option, ptq=False,
                                                extra=_gptq_ptq_overrides(scheme))
        for variant in args.variants:
            if variant.startswith(("qat_ranges", "qat_gptq")) and scheme not in RANGE_LEARNING_SCHEMES:
                continue  # range learning needs an integer grid
            variant_started = time.perf_counter()
            config = _gptq_config(scheme) if variant == "qat_gptq" else "smollm2/135M_qat_full"
            overrides = _overridden([*_variant_overrides(variant, args.steps, scheme),
                                     *_scheme_overrides(scheme, args.quantizer_option)], args.qat_override)
            trained = _train(base / variant, "qat_distributed", config, args.steps, [*overrides, *seeded],
                             args.reuse)
            checkpoints[variant] = _quantize(trained, base / variant, scheme, args.quantizer_option, ptq=False)
            minutes[f"seed {seed}/{scheme}/{variant}"] = round((time.perf_counter() - variant_started) / 60, 1)
        for documents in args.eval_documents:
            results.setdefault(_held_out_label(documents), {})[scheme] = _evaluate(
                checkpoints, _eval_dir(base, documents, args), documents)
    return results


def _held_out_label(documents: int) -> str:
    """The report's key for the held-out set of the first `documents` validation topics."""
    return f"{documents}_documents"


def _eval_dir(base: Path, documents: int, args: argparse.Namespace) -> Path:
    """`eval` for the first held-out set asked for (the layout before several could be), else one per size."""
    return base / ("eval" if documents == args.eval_documents[0] else f"eval_{_held_out_label(documents)}")


def _evaluate(checkpoints: dict[str, Path], out: Path, documents: int) -> dict:
    """Held-out perplexity of every checkpoint on the first `documents` validation topics, and the share
    of PTQ's loss each recovers: over all of them, and per topic (`per_document`, keyed `document_<n>`)."""
    listed = ", ".join(f"{name}: {path}" for name, path in checkpoints.items())
    run_command(["eval", "--config", "eval", f"output_dir={out}", "~checkpoint_dir",
                 f"checkpoints={{{listed}}}", f"perplexity.max_documents={documents}", "perplexity.per_document=true"])
    r = json.loads((out / "eval_results.json").read_text())

    def of_metric(metric: str) -> dict:
        return {"perplexity": {n: m[metric] for n, m in r["checkpoints"].items()},
                "recovered_share": {n: s[metric] for n, s in r["recovered_share"].items()}}

    topics = [m.split("/")[0] for m in r["higher_is_better"] if m.startswith("document_")]
    return {**of_metric("perplexity"), "per_document": {topic: of_metric(f"{topic}/perplexity") for topic in topics}}


def summarize_seeds(by_seed: dict[int, dict]) -> dict:
    """Per scheme and variant, the recovered share's mean, min, max and standard error (of the mean) over
    the seeds (one seed's share moved by up to twelve points between seeds in docs/benchmarks.md, so read
    goals against the mean, and the mean against its standard error)."""
    summary: dict = {}
    for results in by_seed.values():
        for scheme, r in results.items():
            for variant, share in r["recovered_share"].items():
                if share is not None:  # None: PTQ lost nothing beyond noise on that seed
                    summary.setdefault(scheme, {}).setdefault(variant, []).append(share)
    return {scheme: {variant: {"mean": round(statistics.fmean(shares), 4), "min": min(shares), "max": max(shares),
                               "standard_error": (round(statistics.stdev(shares) / len(shares) ** 0.5, 4)
                                                  if len(shares) > 1 else None),
                               "seeds": len(shares)}
                     for variant, shares in variants.items()}
            for scheme, variants in summary.items()}


def summarize_topics(by_seed: dict[int, dict]) -> dict:
    """{scheme: {topic: {variant: mean recovered share over the seeds}}}: where QAT wins back PTQ's loss
    and where it does not (a share PTQ left nothing to recover for is skipped)."""
    summary: dict = {}
    for results in by_seed.values():
        for scheme, r in results.items():
            for topic, of_topic in r.get("per_document", {}).items():
                for variant, share in of_topic["recovered_share"].items():
                    if share is not None:
                        summary.setdefault(scheme, {}).setdefault(topic, {}).setdefault(variant, []).append(share)
    return {scheme: {topic: {variant: round(statistics.fmean(shares), 4) for variant, shares in variants.items()}
                     for topic, variants in topics.items()}
            for scheme, topics in summary.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=120)
    parser.add_argument("--schemes", nargs="+", default=["8da4w", "q4_0"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="run everything once per seed (data order, initialisation) and report the mean share")
    parser.add_argument("--eval-documents", type=positive_int, nargs="+", default=[3, 5], metavar="N",
                        help="score the first N held-out validation topics, once per N (5: all of them)")
    parser.add_argument("--output-dir", default="/tmp/qattune/bench_quality")
    parser.add_argument("--reuse", action="store_true", help="keep training runs already finished in --output-dir")
    parser.add_argument("--quantizer-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a quantizer option for PTQ and QAT alike (e.g. quantize_output=false)")
    parser.add_argument("--qat-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every QAT training run, in place of the variant's own for "
                             "that key (e.g. fake_quant_after_n_steps=60)")
    args = parser.parse_args()
    from qattune.quant.schemes import SCHEMES  # imports torch: not before the command line is read

    for scheme in args.schemes:
        if scheme not in SCHEMES:
            parser.error(f"--schemes {scheme}: unknown quantization scheme; choose from {', '.join(SCHEMES)}")
    root = Path(args.output_dir).resolve()
    started = time.perf_counter()
    minutes: dict = {}
    # seed 0 keeps the single-seed layout, so --reuse finds runs made before --seeds existed;
    # the recipes print their tables and metrics: to stderr, so that stdout is the JSON report alone
    with contextlib.redirect_stdout(sys.stderr):
        by_seed = {seed: _run_seed(root if seed == 0 else root / f"seed_{seed}", seed, args, minutes)
                   for seed in args.seeds}
    report = {
        "benchmark": "quality",
        "model": "SmolLM2-135M-Instruct",
        "data": "python_docs train split; evaluated on held-out validation topics",
        "steps": args.steps,
        "eval_documents": args.eval_documents,
        "quantizer_options": args.quantizer_option,
        "qat_overrides": args.qat_override,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "minutes_per_qat_run": minutes,
        "results": by_seed[args.seeds[0]],
    }
    if len(args.seeds) > 1:
        report["results_by_seed"] = by_seed
        report["recovered_share_over_seeds"] = {
            label: summarize_seeds({seed: results.get(label, {}) for seed, results in by_seed.items()})
            for label in map(_held_out_label, args.eval_documents)}
        widest = _held_out_label(max(args.eval_documents))  # its topics include the other sets'
        report["recovered_share_per_topic_over_seeds"] = summarize_topics(
            {seed: results.get(widest, {}) for seed, results in by_seed.items()})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
