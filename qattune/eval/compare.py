"""Side-by-side results of several checkpoints (e.g. bf16, ptq, qat) and the share of the PTQ loss recovered.

For a metric where lower is better (perplexity), with values `b` (baseline, the unquantized model),
`p` (PTQ) and `q` (any other checkpoint, e.g. QAT):
    recovered = (p - q) / (p - b)
and where higher is better (accuracy) `recovered = (q - p) / (b - p)`. Both read: the share of PTQ's
degradation that `q` wins back. 1.0: as good as the baseline; 0.0: no better than PTQ; negative: worse
than PTQ; above 1.0: better than the baseline.

A share divides by PTQ's degradation `d` (`p - b` or `b - p`), so it is None (shown as "n/a", with a
footnote under the table saying why) unless `d` stands out from noise:
- `d <= 0`: PTQ is not worse than the baseline, there is nothing to recover;
- `d <= sqrt(se_b**2 + se_p**2)`, the standard error of the difference, from the standard errors that are
  known (lm-eval's `*_stderr`; qattune's perplexity has none): PTQ's loss is within noise;
- the noise floor, for any metric: `d < RELATIVE_FLOOR * |b|` (0.1% of the baseline value), or for a
  metric on a log scale (LOG_SCALE: nll, bits_per_byte, loss) `d < RELATIVE_FLOOR`, about the same 0.1%
  in its perplexity (0.07% for bits). A loss that small (12.3456 -> 12.3489) is rounding noise, and dividing by it
  gives shares of thousands of percent.

In the table, each row's values print with the fewest significant digits (4 to 8) at which different
values print differently, followed by `± stderr` (2 significant digits) where it is known.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from qattune.errors import QattuneError

LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "nll", "nll_per_token",
                   "loss", "ter", "brier_score")
HIGHER_IS_BETTER = ("acc", "acc_norm", "accuracy", "exact_match", "em", "f1", "mc1", "mc2", "bleu", "chrf",
                    "rouge1", "rouge2", "rougeL", "mcc", "pass@1", "contains")
DEFAULT_REFERENCES = {"baseline": "bf16", "ptq": "ptq"}
LOG_SCALE = ("nll", "nll_per_token", "loss", "bits_per_byte")  # x more here: perplexity times e**x (2**x)
RELATIVE_FLOOR = 1e-3
MIN_DIGITS, MAX_DIGITS = 4, 8
NAMES_IN_FOOTNOTE = 3

MISSING = "a baseline or PTQ value is missing"
NOT_DEGRADED = "PTQ is not worse than the baseline"
WITHIN_STDERR = "PTQ's loss is within one standard error of the difference"
BELOW_FLOOR = (f"PTQ's loss is under {RELATIVE_FLOOR:.1%} of the baseline value, or under {RELATIVE_FLOOR:g} "
               "on a log scale")


def metric_base_name(metric: str) -> str:
    """`task/acc_norm,none` -> `acc_norm`: the metric's own name, without task and lm-eval filter."""
    return metric.rsplit("/", 1)[-1].split(",", 1)[0]


def infer_higher_is_better(metric: str) -> bool:
    """The direction of a well-known metric name (lm-eval's and qattune's); a QattuneError otherwise."""
    name = metric_base_name(metric)
    if name in LOWER_IS_BETTER:
        return False
    if name in HIGHER_IS_BETTER:
        return True
    raise QattuneError(f"cannot tell whether higher or lower is better for metric {metric!r}; "
                       "pass higher_is_better={'" + metric + "': true|false}")


def _loss(reference: float, value: float, higher_is_better: bool) -> float:
    """How much worse `value` is than `reference` (negative: better)."""
    return (reference - value) if higher_is_better else (value - reference)


def noise_floor(metric: str, baseline: float) -> float:
    """The smallest PTQ loss a share is computed for (module docs)."""
    return RELATIVE_FLOOR * (1.0 if metric_base_name(metric) in LOG_SCALE else abs(baseline))


def no_share_reason(baseline: Optional[float], ptq: Optional[float], higher_is_better: bool,
                    baseline_stderr: Optional[float] = None, ptq_stderr: Optional[float] = None,
                    floor: Optional[float] = None) -> Optional[str]:
    """Why no recovered share can be computed against these baseline and PTQ values (see module docs), or
    None when it can. `floor`: the noise floor, default RELATIVE_FLOOR * |baseline|."""
    if baseline is None or ptq is None or not (math.isfinite(baseline) and math.isfinite(ptq)):
        return MISSING
    degradation = _loss(baseline, ptq, higher_is_better)
    if degradation <= 0:
        return NOT_DEGRADED
    if degradation <= math.hypot(baseline_stderr or 0.0, ptq_stderr or 0.0):
        return WITHIN_STDERR
    if degradation < (RELATIVE_FLOOR * abs(baseline) if floor is None else floor):
        return BELOW_FLOOR
    return None


def recovered_share(baseline: float, ptq: float, candidate: float, higher_is_better: bool,
                    baseline_stderr: Optional[float] = None, ptq_stderr: Optional[float] = None) -> Optional[float]:
    """The share of PTQ's degradation that `candidate` recovers (see module docs); None if PTQ lost nothing
    beyond noise (the noise floor: RELATIVE_FLOOR * |baseline|) or a value is not finite."""
    if not math.isfinite(candidate) or no_share_reason(baseline, ptq, higher_is_better, baseline_stderr,
                                                       ptq_stderr) is not None:
        return None
    return _recovered(baseline, ptq, candidate, higher_is_better)


def _recovered(baseline: float, ptq: float, candidate: float, higher_is_better: bool) -> float:
    return _loss(candidate, ptq, higher_is_better) / _loss(baseline, ptq, higher_is_better)


def format_values(values: Sequence[Optional[float]]) -> list[str]:
    """Each value ("-" for None) with the fewest significant digits, MIN_DIGITS to MAX_DIGITS, at which
    different values print differently."""
    distinct = {v for v in values if v is not None}
    for digits in range(MIN_DIGITS, MAX_DIGITS + 1):
        texts = {v: f"{v:.{digits}g}" for v in distinct}
        if len(set(texts.values())) == len(texts):
            break
    return ["-" if v is None else texts[v] for v in values]


def format_share(share: Optional[float]) -> str:
    """A recovered share as a percentage with one decimal, "n/a" for None."""
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _with_stderr(text: str, stderr: Optional[float]) -> str:
    return text if stderr is None or text == "-" else f"{text} ± {stderr:.2g}"


def _name_list(names: list[str]) -> str:
    """`a, b, c and 4 more`: at most NAMES_IN_FOOTNOTE names."""
    shown = ", ".join(names[:NAMES_IN_FOOTNOTE])
    more = len(names) - NAMES_IN_FOOTNOTE
    return f"{shown} and {more} more" if more > 0 else shown


@dataclass(frozen=True)
class Comparison:
    """Metric values per checkpoint (in the given order), metric directions, recovered shares of every
    checkpoint other than the baseline and PTQ ones (`recovered[checkpoint][metric]`), the known standard
    errors (`stderr[checkpoint][metric]`) and, per metric without shares, why (`no_share`)."""

    checkpoints: dict[str, dict[str, Optional[float]]]
    higher_is_better: dict[str, bool]
    baseline: Optional[str]
    ptq: Optional[str]
    recovered: dict[str, dict[str, Optional[float]]]
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    no_share: dict[str, str] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return list(self.higher_is_better)

    def value_cells(self, metric: str) -> list[str]:
        """The metric's value in each checkpoint, as the table prints it (with `± stderr` where known)."""
        names = list(self.checkpoints)
        texts = format_values([self.checkpoints[n].get(metric) for n in names])
        return [_with_stderr(text, self.stderr.get(n, {}).get(metric)) for text, n in zip(texts, names)]

    def footnote(self) -> Optional[str]:
        """One line saying why shares are "n/a", per reason the metrics concerned; None if none are."""
        by_reason: dict[str, list[str]] = {}
        for metric, reason in self.no_share.items():
            by_reason.setdefault(reason, []).append(metric)
        parts = [f"{reason} ({_name_list(metrics)})" for reason, metrics in by_reason.items()]
        return "n/a: " + "; ".join(parts) if parts and self.recovered else None

    def table(self) -> str:
        """One plain-text table: a row per metric, a column per checkpoint, then the recovered shares; a
        footnote when a share is "n/a"."""
        header = ["metric", *self.checkpoints, *(f"{name} recovered" for name in self.recovered)]
        rows = [header]
        for metric in self.metrics:
            arrow = "↑" if self.higher_is_better[metric] else "↓"
            shares = [format_share(self.recovered[n][metric]) for n in self.recovered]
            rows.append([f"{metric} {arrow}", *self.value_cells(metric), *shares])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        footnote = self.footnote()
        return "\n".join(lines + ([footnote] if footnote else []))

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "ptq": self.ptq, "checkpoints": self.checkpoints,
                "higher_is_better": self.higher_is_better, "recovered_share": self.recovered,
                "stderr": self.stderr, "no_share_reason": self.no_share}

    def write_json(self, path: Union[str, os.PathLike], pending: Sequence[str] = ()) -> Path:
        """Write `to_dict()` to `path` atomically (a reader, or a crash, sees the old file or the new one),
        with `"pending"`: the checkpoints not evaluated yet (`[]`: the file is complete)."""
        from qattune.checkpoint.atomic import atomic_write_text

        data = {**self.to_dict(), "pending": list(pending)}
        return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def reference_checkpoints(names: Sequence[str], baseline: Optional[str] = None, ptq: Optional[str] = None,
                          defaults: bool = True) -> tuple[Optional[str], Optional[str]]:
    """The baseline and PTQ checkpoint among `names`: as given (checked), else (with `defaults`) "bf16" /
    "ptq" when present."""
    given = {"baseline": baseline, "ptq": ptq}
    for role, name in given.items():
        if name is not None and name not in names:
            raise QattuneError(f"{role} checkpoint {name!r} is not among the checkpoints ({', '.join(names)}); "
                               f"set {role} to one of them")
    fallback = {role: default if defaults and default in names else None
                for role, default in DEFAULT_REFERENCES.items()}
    chosen = {role: name if name is not None else fallback[role] for role, name in given.items()}
    if chosen["baseline"] is not None and chosen["baseline"] == chosen["ptq"]:
        raise QattuneError(f"baseline and ptq both name checkpoint {chosen['baseline']!r}; set them to the "
                           "unquantized and the PTQ checkpoint")
    return chosen["baseline"], chosen["ptq"]


def compare_checkpoints(
    results: Mapping[str, Mapping[str, float]],
    baseline: Optional[str] = None,
    ptq: Optional[str] = None,
    higher_is_better: Optional[Mapping[str, bool]] = None,
    stderr: Optional[Mapping[str, Mapping[str, float]]] = None,
    default_references: bool = True,
) -> Comparison:
    """Compare `results` (`{checkpoint: {metric: value}}`, e.g. from `perplexity(...).metrics()` or
    `LmEvalResults.flat()`). `baseline` / `ptq` name the unquantized and the PTQ checkpoint (default:
    "bf16" / "ptq" when present); recovered shares need both. `higher_is_better` overrides or adds metric
    directions; well-known names are inferred. `stderr` (`{checkpoint: {metric: standard error}}`, e.g.
    lm-eval's) is shown next to the values and keeps shares of a PTQ loss within noise out (module docs).
    `default_references=False`: no "bf16" / "ptq" defaults, only the references given."""
    if not results:
        raise QattuneError("compare_checkpoints got no results; evaluate at least one checkpoint")
    baseline, ptq = reference_checkpoints(list(results), baseline, ptq, default_references)
    metrics: list[str] = []
    for values in results.values():
        metrics += [m for m in values if m not in metrics]
    given = dict(higher_is_better or {})
    directions = {m: given[m] if m in given else infer_higher_is_better(m) for m in metrics}
    table = {name: {m: _finite_or_none(values.get(m)) for m in metrics} for name, values in results.items()}
    errors = _stderr_table(stderr or {}, list(results), metrics)
    if baseline is None or ptq is None:
        return Comparison(table, directions, baseline, ptq, {}, errors)
    reasons = {m: _no_share_reason(table, errors, baseline, ptq, m, directions[m]) for m in metrics}
    recovered = {name: {m: None if reasons[m] else _share(table, baseline, ptq, name, m, directions[m])
                        for m in metrics}
                 for name in results if name not in (baseline, ptq)}
    no_share = {m: reason for m, reason in reasons.items() if reason is not None}
    return Comparison(table, directions, baseline, ptq, recovered, errors, no_share)


def _no_share_reason(table: dict, errors: dict, baseline: str, ptq: str, metric: str, higher: bool) -> Optional[str]:
    reference = table[baseline][metric]
    floor = None if reference is None else noise_floor(metric, reference)
    return no_share_reason(reference, table[ptq][metric], higher, errors[baseline].get(metric),
                           errors[ptq].get(metric), floor)


def _share(table: dict, baseline: str, ptq: str, name: str, metric: str, higher: bool) -> Optional[float]:
    values = (table[baseline][metric], table[ptq][metric], table[name][metric])
    return None if None in values else _recovered(*values, higher)


def _stderr_table(stderr: Mapping[str, Mapping[str, float]], names: list[str],
                  metrics: list[str]) -> dict[str, dict[str, float]]:
    """`{checkpoint: {metric: standard error}}` for every checkpoint, keeping the finite errors of known metrics."""
    for name in stderr:
        if name not in names:
            raise QattuneError(f"stderr names checkpoint {name!r}, which has no results ({', '.join(names)}); "
                               "give standard errors of the compared checkpoints only")
    return {name: {m: float(se) for m, se in stderr.get(name, {}).items()
                   if m in metrics and _finite_or_none(se) is not None}
            for name in names}


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    """Missing, NaN and infinite values are None (shown as "-"; JSON has no NaN or infinity)."""
    return None if value is None or not math.isfinite(float(value)) else float(value)
