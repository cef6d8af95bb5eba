"""`QATQuantizer` and `PTQQuantizer`: prepare (fake quantization), set_fake_quant, convert (real modules).

Both follow the quantizer protocol of DESIGN §3 and work on any nn.Module: they find nn.Linear and
nn.Embedding layers by type, decide per layer from the scheme config and the name filters (`plan`),
and swap modules in place. Each call leaves a `QuantReport` in `quantizer.report`.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Iterable, Literal, Optional

import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.quant.block_reconstruction import DEFAULT_LR as RECONSTRUCTION_LR
from qattune.quant.filters import DEFAULT_OUTPUT_HEAD_PATTERN, ModuleNameFilter
from qattune.quant.modules import FakeQuantEmbedding, FakeQuantLinear, QuantizedEmbedding, QuantizedLinear
from qattune.quant.modules.activation_cache import SharedActivationFakeQuant
from qattune.quant.modules.recompute import RecomputedWeights
from qattune.quant.modules.weight_cache import refresh_caches
from qattune.quant.plan import LayerPlan, check_block_sizes, iter_layers, plan_layer
from qattune.quant.range_learning import RANGE_INITS, LearnedRangeFakeQuantizer
from qattune.quant.report import QuantReport
from qattune.quant.schemes import SchemeConfig, resolve_scheme_config

if TYPE_CHECKING:
    from qattune.quant.gptq import GPTQReport

logger = logging.getLogger(__name__)

ROUNDING_INITS = ("nearest", "gptq")

QUANT_CONFIG_ATTR = "qattune_quantization"  # set on a converted model: {"config": ..., "report": ...}
_REFRESH_HOOK_ATTR = "_qattune_weight_cache_hook"

_FLOAT_TYPES = (nn.Linear, nn.Embedding)
_FAKE_QUANT_TYPES = (FakeQuantLinear, FakeQuantEmbedding)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def fake_quant_modules(model: nn.Module) -> list[nn.Module]:
    """The fake-quantized modules of `model`."""
    return [m for m in model.modules() if isinstance(m, _FAKE_QUANT_TYPES)]


@torch.compiler.disable
def _refresh_weight_caches(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook on the root: bring every cached fake-quantized weight up to date in eager code,
    so compiled layers (which skip the per-layer check) read current caches; after an optimizer step,
    all of them in one compiled call per format."""
    entries = [module.cache_entry_for_forward() for module in fake_quant_modules(model)]
    refresh_caches([entry for entry in entries if entry is not None])


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization of every fake-quantized module on or off (off: exact float modules).

    Turning it on starts learned ranges from the weights as they are now (as their first forward
    would); doing it here, between steps, is what makes that work on FSDP2 shards too.
    """
    for module in fake_quant_modules(model):
        module.fake_quant_enabled = enabled
        learner = getattr(module, "weight_range_learner", None)
        if enabled and learner is not None and not learner.is_initialized and not module.weight.is_meta:
            learner.initialize(module.weight)


def _block_of(name: str) -> Optional[str]:
    """The repeated block a layer belongs to: its name up to the last numeric part ("layers.3.attn.q_proj"
    -> "layers.3"); None outside any."""
    parts = name.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[:numeric[-1] + 1]) if numeric else None


class _SchemeQuantizer:
    """The protocol shared by QAT and PTQ: a scheme config, name filters, and the last report."""

    range_init: str = "absmax"
    recompute_weights: Optional[bool] = False
    recompute_activations: bool = False

    def __init__(self, config: SchemeConfig) -> None:
        self.config = config
        self.name_filter = ModuleNameFilter(config.include, config.exclude)
        self.report: Optional[QuantReport] = None

    def _recomputes_weights(self) -> bool:
        """`recompute_weights`, where None means: when training is sharded over several processes (FSDP2
        gathers a block's weights for its forward and frees them after; a fake-quantized copy kept for
        the backward would be every rank's full copy of the weights, not its shard)."""
        if self.recompute_weights is not None:
            return self.recompute_weights
        return torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1

    # -- planning ------------------------------------------------------------------------------
    def plan(self, model: nn.Module, supported_types: tuple[type, ...]) -> list[LayerPlan]:
        """Per-layer decisions; a QattuneError if a quantized layer's width does not fit the blocks."""
        plans = [plan_layer(name, module, kind, self.config, self.name_filter, supported_types)
                 for name, module, kind in iter_layers(model)]
        check_block_sizes(plans, self.config)
        return plans

    def _finish(self, stage: str, plans: list[LayerPlan]) -> QuantReport:
        self.report = QuantReport(stage, self.config.scheme, [p.record() for p in plans])  # type: ignore[arg-type]
        if not self.report.quantized:
            logger.warning("quantizer %s found no layer to quantize", self.config.scheme)
        logger.debug("%s", self.report)  # recipes print it; INFO logging would show it twice
        return self.report

    # -- protocol ------------------------------------------------------------------------------
    def set_fake_quant(self, model: nn.Module, enabled: bool) -> None:
        """Turn fake quantization on or off in a prepared model."""
        set_fake_quant(model, enabled)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap the scheme's Linear/Embedding layers for fake-quantized ones (in place; returns `model`)."""
        plans = self.plan(model, _FLOAT_TYPES)
        if self.config.range_learning:
            self._check_range_learning(plans)
        shared_activations: dict[str, SharedActivationFakeQuant] = {}
        recomputed_weights: dict[tuple[str, str], RecomputedWeights] = {}
        for plan in plans:
            if plan.quantized:
                _set_submodule(model, plan.name, self._fake_quant_module(plan, shared_activations, recomputed_weights))
        if not hasattr(model, _REFRESH_HOOK_ATTR):
            setattr(model, _REFRESH_HOOK_ATTR, model.register_forward_pre_hook(_refresh_weight_caches))
        self._finish("prepare", plans)
        return model

    def convert(self, model: nn.Module) -> nn.Module:
        """Replace fake-quantized layers (prepared) or float layers (not prepared) by real quantized
        modules with packed weights (in place; returns `model`)."""
        plans = self.plan(model, _FLOAT_TYPES + _FAKE_QUANT_TYPES)
        for plan in plans:
            if plan.quantized:
                _set_submodule(model, plan.name, self._quantized_module(plan))
            elif isinstance(plan.module, _FAKE_QUANT_TYPES):  # prepared under other options
                _set_submodule(model, plan.name, plan.module.to_float())
        hook = getattr(model, _REFRESH_HOOK_ATTR, None)
        if hook is not None:
            hook.remove()
            delattr(model, _REFRESH_HOOK_ATTR)
        report = self._finish("convert", plans)
        setattr(model, QUANT_CONFIG_ATTR, {"config": self.config.to_dict(), "report": report.to_dict()})
        return model

    # -- module builders -------------------------------------------------------------------------
    def _check_range_learning(self, plans: list[LayerPlan]) -> None:
        """Range learning needs an integer grid for the scheme's weights; refuse before any module is
        swapped. Layers in a format without one (Q8_0 embeddings and head of q4_0) keep dynamic scales."""
        quantized = [plan for plan in plans if plan.quantized]
        if quantized and not any(plan.weight_format.learnable_grid() for plan in quantized):
            raise QattuneError(
                f"range_learning=true: scheme {self.config.scheme!r} quantizes weights with "
                f"{quantized[0].weight_format.name}, which has no integer grid to learn scales on "
                "(schemes with one: 8da4w, 8w, 8da8w, q4_0); set range_learning=false or pick one of those"
            )

    def _range_learner(self, plan: LayerPlan) -> Optional[nn.Module]:
        grid = plan.weight_format.learnable_grid() if self.config.range_learning else None
        if grid is None:
            return None
        weight = plan.module.weight
        return LearnedRangeFakeQuantizer(grid, tuple(weight.shape), self.range_init).to(weight.device)

    def _fake_quant_module(
        self, plan: LayerPlan, shared_activations: dict[str, SharedActivationFakeQuant],
        recomputed_weights: dict[tuple[str, str], RecomputedWeights],
    ) -> nn.Module:
        """The fake-quant module of one layer; Linear layers with the same activation format share one
        activation fake quantizer, which reuses its result when they read the same tensor, and under
        `recompute_weights` those of one block and weight format quantize their weights together."""
        learner = self._range_learner(plan)
        if plan.kind == "Embedding":
            return FakeQuantEmbedding(plan.module, plan.weight_format, learner)
        shared = None
        if plan.activation_format is not None:
            shared = shared_activations.setdefault(repr(plan.activation_format),
                                                   SharedActivationFakeQuant(plan.activation_format, self.recompute_activations))
        linear = FakeQuantLinear(plan.module, plan.weight_format, plan.activation_format, learner, shared)
        recompute = self._recomputes_weights()
        linear.recompute_weight = recompute
        block = _block_of(plan.name)
        if recompute and learner is None and block is not None:
            group = recomputed_weights.setdefault((block, repr(plan.weight_format)),
                                                  RecomputedWeights(plan.weight_format))
            group.members.append(linear)
            linear.recomputed_weights = group
        return linear

    def _quantized_module(self, plan: LayerPlan) -> nn.Module:
        module = plan.module
        learner = getattr(module, "weight_range_learner", None)
        quantized = None
        if learner is not None:
            with torch.no_grad():
                quantized = learner.quantize(module.weight.detach())
        if plan.kind == "Embedding":
            return QuantizedEmbedding.from_embedding(module, plan.weight_format, quantized)
        return QuantizedLinear.from_weight(module.weight, module.bias, plan.weight_format,
                                           plan.activation_format, quantized)


class QATQuantizer(_SchemeQuantizer):
    """Quantization-aware training: `prepare` inserts fake quantization, `convert` makes it real.

    Args:
        scheme: one of 8da4w, 4w, 8w, 8da8w, fp8, mxfp8, mxfp4, nvfp4, q4_0, q8_0, nf4.
        group_size: weight group size for 8da4w (default 32), 4w (128) and nf4 (64); others have none.
        quantize_activations: activation fake quantization; None: the scheme's default (optional for
            fp8, mxfp8, mxfp4, nvfp4 (default on) and q4_0, q8_0 (default off)).
        quantize_embedding: quantize nn.Embedding tables (weight-only); None: the scheme's default
            (on for q4_0/q8_0, off otherwise).
        quantize_output: quantize the output head (the Linear named by `output_head_pattern`);
            None: the scheme's default (off for fp8, mx*, nvfp4, nf4; on otherwise).
        include: module-name regexes (re.search); if given, only matching layers are quantized.
        exclude: module-name regexes; matching layers stay in float.
        output_head_pattern: regex naming the output head.
        range_learning: learn the weight scales (LSQ) of layers whose format is an integer grid (8da4w,
            8w, 8da8w; q4_0's Q4_0 layers, while its Q8_0 embeddings and head keep dynamic scales);
            `convert` (and the GGUF export) uses them.
        range_init: where learned scales start: "absmax" (the dynamic scales: training starts at plain
            fake quantization), "cover" (per group, the smallest grid whose end codes hold the
            extremes) or "mse" (per group, the clipping range of least squared error).
        recompute_weights: keep no fake-quantized copy of trained Linear weights between the forward and
            the backward, or between steps; quantize them again in the backward instead (saves one copy
            of the weights' memory, costs one more fake quantization per layer and micro-batch; on a GPU
            the weights of one transformer block are quantized in one call). None (the default): on when
            training runs in several processes (FSDP2), where the kept copy would be each rank's full
            copy of the weights, not its shard (SmolLM2, 2 ranks: 622 MB kept for the backward, against
            116 MB recomputed and 112 MB in float training); off in one process, where it is one copy.
        recompute_activations: Linear layers with quantized activations (8da4w, 8da8w) keep their float
            input for the backward, as float training does, instead of its fake quantization and clipped
            mask, and quantize it again there (once per input shared by q/k/v or gate/up). With
            `recompute_weights`, QAT keeps for the backward exactly what float training keeps: on an H100
            (Llama-3.2-1B sizes, seq 2048, batch 4) 8da4w and 8da8w peaked at 1.001x of bf16's memory, at
            0.85-0.91x its speed (docs/benchmarks.md).
        rounding_init: where the trained weights' roundings start: "nearest" (the weights as loaded) or
            "gptq" (the recipe moves each block weight so that nearest rounding gives GPTQ's code,
            calibrated on `gptq_batches` training batches; see `qattune.quant.gptq`), when fake
            quantization starts (`fake_quant_after_n_steps`). "gptq" needs range_learning (its group
            scales stay fixed).
            Measured on SmolLM2-135M: it raises the share of PTQ's loss QAT recovers from 79% to 81.5%
            (docs/benchmarks.md).
        gptq_batches: training batches GPTQ calibrates on (rounding_init="gptq").
        gptq_output_head: with rounding_init="gptq", round the output head with GPTQ too, after the
            blocks (it needs quantize_output and learned ranges). A head tied to the token embedding
            moves the embedding with it (on SmolLM2-135M by a fifth of a grid step on average). Measured
            there (8da4w): AWQ + GPTQ with no training recovers 80% of PTQ's held-out loss instead of 66%.
        awq_scaling: with rounding_init="gptq", before each transformer block is rounded, scale its
            Linear layers' input channels by `mean|x| ** alpha` and fold the inverse into the norm gains
            and the producing rows (AWQ; exact in float, alpha chosen per place by the rounding error on
            the calibration batches; `qattune.quant.awq`). The trained checkpoint is a plain model whose
            norm gains and weights carry the factors. Measured on SmolLM2-135M (8da4w, five seeds):
            QAT from it recovers 84.1% of PTQ's loss on 3 held-out topics (docs/benchmarks.md).
        reconstruction_epochs: with rounding_init="gptq", after each transformer block's rounding, train
            its latent weights (fake quantization on) towards the float block's outputs for this many
            passes over the calibration batches (`qattune.quant.block_reconstruction`); 0: GPTQ alone.
        reconstruction_lr: the learning rate of that training (Adam, cosine schedule).
    """

    def __init__(
        self,
        scheme: Literal["8da4w", "4w", "8w", "8da8w", "fp8", "mxfp8", "mxfp4", "nvfp4", "q4_0", "q8_0", "nf4"],
        group_size: Optional[int] = None,
        quantize_activations: Optional[bool] = None,
        quantize_embedding: Optional[bool] = None,
        quantize_output: Optional[bool] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        output_head_pattern: str = DEFAULT_OUTPUT_HEAD_PATTERN,
        range_learning: bool = False,
        range_init: Literal["absmax", "cover", "mse"] = "absmax",
        recompute_weights: Optional[bool] = None,
        recompute_activations: bool = False,
        rounding_init: Literal["nearest", "gptq"] = "nearest",
        gptq_batches: int = 64,
        gptq_output_head: bool = False,
        awq_scaling: bool = False,
        reconstruction_epochs: int = 0,
        reconstruction_lr: float = RECONSTRUCTION_LR,
    ) -> None:
        super().__init__(resolve_scheme_config(
            scheme, group_size, quantize_activations, quantize_embedding, quantize_output,
            include, exclude, output_head_pattern, range_learning,
        ))
        if range_init not in RANGE_INITS:
            raise QattuneError(f"quantizer option range_init={range_init!r}: choose one of {', '.join(RANGE_INITS)}")
        if range_init != "absmax" and not range_learning:
            raise QattuneError(f"quantizer option range_init={range_init!r} sets where learned scales start; "
                               "add range_learning=true, or remove range_init")
        if rounding_init not in ROUNDING_INITS:
            raise QattuneError(f"quantizer option rounding_init={rounding_init!r}: choose one of {', '.join(ROUNDING_INITS)}")
        if rounding_init == "gptq" and not range_learning:
            raise QattuneError("quantizer option rounding_init=gptq keeps each group's scale fixed while it rounds; "
                               "add range_learning=true")
        if gptq_batches < 1:
            raise QattuneError(f"quantizer option gptq_batches={gptq_batches}: give at least 1 calibration batch")
        if gptq_output_head and rounding_init != "gptq":
            raise QattuneError("quantizer option gptq_output_head rounds the head in GPTQ's calibration pass; "
                               "add rounding_init=gptq, or remove gptq_output_head")
        if gptq_output_head and not self.config.quantize_output:
            raise QattuneError(f"quantizer option gptq_output_head rounds the output head, which scheme "
                               f"{scheme} leaves in float here; set quantize_output=true, or remove gptq_output_head")
        if awq_scaling and rounding_init != "gptq":
            raise QattuneError("quantizer option awq_scaling scales each block's channels in GPTQ's calibration pass; "
                               "add rounding_init=gptq, or remove awq_scaling")
        if reconstruction_epochs < 0 or reconstruction_lr <= 0:
            raise QattuneError(f"quantizer options reconstruction_epochs={reconstruction_epochs}, reconstruction_lr="
                               f"{reconstruction_lr}: give epochs >= 0 and a positive learning rate")
        if reconstruction_epochs and rounding_init != "gptq":
            raise QattuneError(f"quantizer option reconstruction_epochs={reconstruction_epochs} trains each block "
                               "after GPTQ has rounded it; add rounding_init=gptq, or remove reconstruction_epochs")
        self.reconstruction_epochs = reconstruction_epochs
        self.reconstruction_lr = reconstruction_lr
        self.range_init = range_init
        self.recompute_weights = recompute_weights
        self.recompute_activations = recompute_activations
        self.rounding_init = rounding_init
        self.gptq_batches = gptq_batches
        self.gptq_output_head = gptq_output_head
        self.awq_scaling = awq_scaling

    def initialize_rounding(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                            progress: bool = False) -> Optional[GPTQReport]:
        """Before training a prepared model: with rounding_init="gptq", move the block weights to GPTQ's
        roundings (first scaling their channels, with `awq_scaling`; then, with `reconstruction_epochs`,
        training each block towards its float outputs), and the output head's with `gptq_output_head`,
        calibrated on `batches` (at most `gptq_batches` are read); a no-op for "nearest"."""
        if self.rounding_init != "gptq":
            return None
        from qattune.quant.gptq import gptq_initialize

        return gptq_initialize(model, itertools.islice(batches, self.gptq_batches), progress=progress,
                               awq_scaling=self.awq_scaling, reconstruction_epochs=self.reconstruction_epochs,
                               reconstruction_lr=self.reconstruction_lr, round_output_head=self.gptq_output_head)


class PTQQuantizer(_SchemeQuantizer):
    """Post-training quantization with the same schemes and options as `QATQuantizer` (no range learning).

    `convert(model)` quantizes a float model directly; `prepare(model)` gives its fake-quantized
    equivalent (e.g. to evaluate PTQ numerics in float).
    """

    def __init__(
        self,
        scheme: Literal["8da4w", "4w", "8w", "8da8w", "fp8", "mxfp8", "mxfp4", "nvfp4", "q4_0", "q8_0", "nf4"],
        group_size: Optional[int] = None,
        quantize_activations: Optional[bool] = None,
        quantize_embedding: Optional[bool] = None,
        quantize_output: Optional[bool] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        output_head_pattern: str = DEFAULT_OUTPUT_HEAD_PATTERN,
    ) -> None:
        super().__init__(resolve_scheme_config(
            scheme, group_size, quantize_activations, quantize_embedding, quantize_output,
            include, exclude, output_head_pattern,
        ))
