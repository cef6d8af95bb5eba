"""Decide, layer by layer, what a scheme does to a model: quantize with which formats, or skip and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from torch import nn

from qattune.errors import QattuneError
from qattune.quant.filters import ModuleNameFilter, is_output_head
from qattune.quant.formats import NumericFormat
from qattune.quant.report import LayerRecord
from qattune.quant.schemes import SchemeConfig


@dataclass
class LayerPlan:
    """One Linear/Embedding layer: its formats if it is quantized, the reason if it is skipped."""

    name: str
    module: nn.Module
    kind: str  # "Linear" or "Embedding"
    is_output: bool
    weight_format: Optional[NumericFormat] = None
    activation_format: Optional[NumericFormat] = None
    skip_reason: Optional[str] = None

    @property
    def quantized(self) -> bool:
        return self.skip_reason is None

    def record(self) -> LayerRecord:
        weight = self.module.weight
        return LayerRecord(
            name=self.name,
            kind=self.kind,  # type: ignore[arg-type]
            shape=tuple(weight.shape) if weight is not None else (),
            quantized=self.quantized,
            weight_format=self.weight_format.name if self.weight_format is not None else None,
            activation_format=self.activation_format.name if self.activation_format is not None else None,
            reason=self.skip_reason,
        )


def _layer_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Embedding):
        return "Embedding"
    return None


def iter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, module, kind) of every Linear/Embedding layer, each module once."""
    for name, module in model.named_modules():
        kind = _layer_kind(module)
        if kind is not None:
            yield name, module, kind


def plan_layer(name: str, module: nn.Module, kind: str, config: SchemeConfig,
               name_filter: ModuleNameFilter, supported_types: tuple[type, ...]) -> LayerPlan:
    """What `config` does to one layer (no error raised here; see `check_block_sizes`)."""
    is_output = kind == "Linear" and is_output_head(name, config.output_head_pattern)
    plan = LayerPlan(name, module, kind, is_output)
    if type(module) not in supported_types:
        plan.skip_reason = f"unsupported module type {type(module).__name__}"
    elif kind == "Embedding" and not config.quantize_embedding:
        plan.skip_reason = "embedding (quantize_embedding=false)"
    elif is_output and not config.quantize_output:
        plan.skip_reason = "output head (quantize_output=false)"
    else:
        plan.skip_reason = name_filter.skip_reason(name)
    if plan.quantized:
        plan.weight_format = config.weight_format(kind, is_output)
        plan.activation_format = config.activation_format() if kind == "Linear" else None
    return plan


def _reduction_width(plan: LayerPlan) -> int:
    return plan.module.weight.shape[-1]


def check_block_sizes(plans: list[LayerPlan], config: SchemeConfig) -> None:
    """Refuse layers whose width the scheme's group/block size does not divide (never skip silently)."""
    bad = []
    for plan in plans:
        if not plan.quantized:
            continue
        for fmt in (plan.weight_format, plan.activation_format):
            block = getattr(fmt, "block_size", None)
            if block and _reduction_width(plan) % block:
                bad.append((plan, fmt, block))
                break
    if not bad:
        return
    plan, fmt, block = bad[0]
    width = "embedding_dim" if plan.kind == "Embedding" else "in_features"
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    group_hint = "pick a group_size that divides it, or " if config.group_size is not None else ""
    raise QattuneError(
        f"layer {plan.name!r}: {width} {_reduction_width(plan)} is not divisible by the {fmt.name} "
        f"block size {block} of scheme {config.scheme!r}{more}; {group_hint}keep it in float with "
        f"exclude=['^{plan.name}$']"
    )
