"""Side-by-side results of several checkpoints (e.g. bf16, ptq, qat) and the share of the PTQ loss recovered.

For a metric where lower is better (perplexity), with values `b` (baseline, the unquantized model),
`p` (PTQ) and `q` (any other checkpoint, e.g. QAT):
    recovered = (p - q) / (p - b)
and where higher is better (accuracy) `recovered = (q - p) / (b - p)`. Both read: the share of PTQ's
degradation that `q` wins back. 1.0: as good as the baseline; 0.0: no better than PTQ; negative: worse
than PTQ; above 1.0: better than the baseline. When PTQ is not worse than the baseline there is nothing
to recover and the share is None (shown as "n/a").
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

from qattune.errors import QattuneError

LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "nll", "nll_per_token",
                   "loss", "ter", "brier_score")
HIGHER_IS_BETTER = ("acc", "acc_norm", "accuracy", "exact_match", "em", "f1", "mc1", "mc2", "bleu", "chrf",
                    "rouge1", "rouge2", "rougeL", "mcc", "pass@1", "contains")


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


def recovered_share(baseline: float, ptq: float, candidate: float, higher_is_better: bool) -> Optional[float]:
    """The share of PTQ's degradation that `candidate` recovers (see module docs); None if PTQ lost nothing."""
    if not all(math.isfinite(v) for v in (baseline, ptq, candidate)):
        return None
    degradation = (baseline - ptq) if higher_is_better else (ptq - baseline)
    if degradation <= 0:
        return None
    gain = (candidate - ptq) if higher_is_better else (ptq - candidate)
    return gain / degradation


@dataclass(frozen=True)
class Comparison:
    """Metric values per checkpoint (in the given order), metric directions, and recovered shares of every
    checkpoint other than the baseline and PTQ ones (`recovered[checkpoint][metric]`)."""

    checkpoints: dict[str, dict[str, Optional[float]]]
    higher_is_better: dict[str, bool]
    baseline: Optional[str]
    ptq: Optional[str]
    recovered: dict[str, dict[str, Optional[float]]]

    @property
    def metrics(self) -> list[str]:
        return list(self.higher_is_better)

    def table(self) -> str:
        """One plain-text table: a row per metric, a column per checkpoint, then the recovered shares."""
        names = list(self.checkpoints)
        header = ["metric", *names, *(f"{name} recovered" for name in self.recovered)]
        rows = [header]
        for metric in self.metrics:
            arrow = "↑" if self.higher_is_better[metric] else "↓"
            values = [_format_value(self.checkpoints[n].get(metric)) for n in names]
            shares = [_format_share(self.recovered[n][metric]) for n in self.recovered]
            rows.append([f"{metric} {arrow}", *values, *shares])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "ptq": self.ptq, "checkpoints": self.checkpoints,
                "higher_is_better": self.higher_is_better, "recovered_share": self.recovered}

    def write_json(self, path: Union[str, os.PathLike]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path


def _format_value(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _format_share(share: Optional[float]) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def compare_checkpoints(
    results: Mapping[str, Mapping[str, float]],
    baseline: Optional[str] = None,
    ptq: Optional[str] = None,
    higher_is_better: Optional[Mapping[str, bool]] = None,
) -> Comparison:
    """Compare `results` (`{checkpoint: {metric: value}}`, e.g. from `perplexity(...).metrics()` or
    `LmEvalResults.flat()`). `baseline` / `ptq` name the unquantized and the PTQ checkpoint (default:
    "bf16" / "ptq" when present); recovered shares need both. `higher_is_better` overrides or adds metric
    directions; well-known names are inferred."""
    if not results:
        raise QattuneError("compare_checkpoints got no results; evaluate at least one checkpoint")
    for role, name in (("baseline", baseline), ("ptq", ptq)):
        if name is not None and name not in results:
            raise QattuneError(f"{role} checkpoint {name!r} is not among the results ({', '.join(results)}); "
                               f"name one of them")
    baseline = baseline if baseline is not None else ("bf16" if "bf16" in results else None)
    ptq = ptq if ptq is not None else ("ptq" if "ptq" in results else None)
    metrics: list[str] = []
    for values in results.values():
        metrics += [m for m in values if m not in metrics]
    given = dict(higher_is_better or {})
    directions = {m: given[m] if m in given else infer_higher_is_better(m) for m in metrics}
    table = {name: {m: _finite_or_none(values.get(m)) for m in metrics} for name, values in results.items()}
    recovered: dict[str, dict[str, Optional[float]]] = {}
    if baseline is not None and ptq is not None:
        for name in results:
            if name in (baseline, ptq):
                continue
            recovered[name] = {m: _share(table, baseline, ptq, name, m, directions[m]) for m in metrics}
    return Comparison(table, directions, baseline, ptq, recovered)


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    """Missing, NaN and infinite values are None (shown as "-"; JSON has no NaN or infinity)."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _share(table: dict, baseline: str, ptq: str, name: str, metric: str, higher: bool) -> Optional[float]:
    values = (table[baseline][metric], table[ptq][metric], table[name][metric])
    return None if None in values else recovered_share(*values, higher)
