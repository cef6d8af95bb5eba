"""What a quantizer did to a model: a per-layer record, counts, and a printable table."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

LayerKind = Literal["Linear", "Embedding"]
_BLOCK_INDEX = re.compile(r"^(.*?)\.(\d+)\.(.*)$")  # `layers.12.attn.q_proj`: prefix, block index, rest


@dataclass(frozen=True)
class LayerRecord:
    """One Linear/Embedding layer and what happened to it."""

    name: str
    kind: LayerKind
    shape: tuple[int, ...]
    quantized: bool
    weight_format: Optional[str] = None
    activation_format: Optional[str] = None
    reason: Optional[str] = None


@dataclass
class QuantReport:
    """The result of `prepare` or `convert`: every Linear/Embedding layer, quantized or skipped."""

    stage: Literal["prepare", "convert", "load"]
    scheme: str
    layers: list[LayerRecord] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.quantized]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.quantized]

    def counts(self) -> dict[str, int]:
        """Counts keyed 'Linear:<weight format>', 'Embedding:<weight format>', and 'skipped'."""
        counter: Counter = Counter()
        for record in self.layers:
            counter[f"{record.kind}:{record.weight_format}" if record.quantized else "skipped"] += 1
        return dict(counter)

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "scheme": self.scheme,
            "counts": self.counts(),
            "layers": [asdict(r) for r in self.layers],
        }

    def __str__(self) -> str:
        lines = [f"qattune {self.stage} report, scheme {self.scheme}: "
                 f"{len(self.quantized)} quantized, {len(self.skipped)} skipped"]
        by_kind: Counter = Counter(
            (r.kind, r.weight_format, r.activation_format) for r in self.quantized
        )
        if by_kind:
            lines.append(f"  {'layer':<10} {'weights':<14} {'activations':<14} {'count':>5}")
            for (kind, weight_format, act_format), count in sorted(by_kind.items(), key=str):
                lines.append(f"  {kind:<10} {weight_format:<14} {act_format or '-':<14} {count:>5}")
        for record in self.skipped:
            lines.append(f"  skipped {record.kind} {record.name}: {record.reason}")
        return "\n".join(lines)

    def layer_table(self) -> str:
        """One row per layer, with layers that differ only in their block index on one row
        (`layers.0-29.attn.q_proj`): name, shape, weight and activation formats or why it was skipped."""
        rows: dict[tuple[str, str, str], list[int]] = {}
        for r in self.layers:
            match = _BLOCK_INDEX.match(r.name)
            pattern, index = (f"{match[1]}.{{}}.{match[3]}", int(match[2])) if match else (r.name, -1)
            shape = "x".join(str(d) for d in r.shape)
            formats = f"{r.weight_format:<10} {r.activation_format or '-'}" if r.quantized else f"skipped: {r.reason}"
            rows.setdefault((pattern, shape, formats), []).append(index)
        names = [pattern.format(_index_ranges(indices)) for (pattern, _, _), indices in rows.items()]
        width = max([len("layer"), *map(len, names)])
        lines = [f"{'layer':<{width}} {'shape':<14} {'weights':<10} activations"]
        lines += [f"{name:<{width}} {shape:<14} {formats}" for name, (_, shape, formats) in zip(names, rows)]
        return "\n".join(line.rstrip() for line in lines)


def _index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    spans: list[list[int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
