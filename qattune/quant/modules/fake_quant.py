"""Fake-quantized Linear and Embedding: float modules whose forward sees quantize-dequantized tensors.

They subclass nn.Linear / nn.Embedding and share the original Parameters, so state-dict keys, optimizer
references and `isinstance` checks are unchanged. `fake_quant_enabled = False` makes them exact float modules.

The weight's fake quantization is cached per optimizer step (see `weight_cache`), with three exceptions
where it is computed in every forward instead: range learning (the weight goes through a learnable-scale
quantizer whose scale is a parameter), weights sharded by FSDP2 (a cache would hold the full unsharded
weight on every rank), and trained Linear weights under `recompute_weights` (see `recompute`). Under
`recompute_activations` the Linear keeps its float input for the backward rather than the quantized one
(`SharedActivationFakeQuant.linear`). Under
torch.compile the compiled code does not check the cache: the prepared model's forward pre-hook
(eager; `cache_entry_for_forward` and `weight_cache.refresh_caches`) brings every cache up to date
first, and layers it has not vouched for compute their fake-quantized weight inline, which is always
exact.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from qattune.quant.formats import NumericFormat
from qattune.quant.modules.activation_cache import SharedActivationFakeQuant
from qattune.quant.modules.recompute import RecomputedWeights, recomputed_fake_quant_linear
from qattune.quant.modules.weight_cache import WeightFakeQuantCache


EMBEDDING_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse")


class _WeightFakeQuant:
    """The weight side shared by FakeQuantLinear and FakeQuantEmbedding."""

    weight: nn.Parameter
    weight_format: NumericFormat
    weight_range_learner: Optional[nn.Module]
    fake_quant_enabled: bool

    def _init_weight_fake_quant(self, weight_format: NumericFormat, range_learner: Optional[nn.Module]) -> None:
        self.weight_format = weight_format
        self.weight_range_learner = range_learner
        self.fake_quant_enabled = True
        self._weight_cache = WeightFakeQuantCache()
        self._cache_weight = True  # False while the weight is sharded (FSDP2) or recomputed
        self._compiled_reads_cache = False  # set by cache_entry_for_forward once the cache is kept current
        self.recompute_weight = False  # set by the quantizer's recompute_weights option (Linear only)

    def _recomputes_weight(self) -> bool:
        """Whether the forward keeps only the float weight for the backward (`recompute_weights`; a
        frozen weight, such as LoRA's base, keeps its cache: it is quantized once, not once per step)."""
        return self.recompute_weight and self.weight_range_learner is None and self.weight.requires_grad

    def _reads_weight_cache(self) -> bool:
        """Whether the forward reads the cached fake-quantized weight (rather than float or learned-range
        or recomputed weights)."""
        return self.fake_quant_enabled and self.weight_range_learner is None and self._cache_weight

    def refresh_weight_cache(self) -> None:
        """Recompute the cached fake-quantized weight if the weight changed (called in eager code)."""
        if self._reads_weight_cache():
            self._weight_cache.refresh(self.weight, self.weight_format)

    def cache_entry_for_forward(self) -> Optional[tuple[WeightFakeQuantCache, torch.Tensor, NumericFormat]]:
        """Called (eagerly) at the start of the prepared model's forward: decide whether the weight is
        cached (not when FSDP2 holds it sharded, nor under `recompute_weights`) and return what
        `refresh_caches` needs to bring the cache up to date for compiled code (None: nothing to refresh)."""
        sharded = isinstance(self.weight, DTensor)
        self._cache_weight = not sharded and not self._recomputes_weight()
        if not self._cache_weight:
            self._weight_cache.clear()
        self._compiled_reads_cache = self._cache_weight
        return (self._weight_cache, self.weight, self.weight_format) if self._reads_weight_cache() else None

    def fake_quantized_weight(self, grad_in_place: bool = False) -> torch.Tensor:
        """The weight as the forward sees it with fake quantization on (`grad_in_place`: the result only
        feeds this module's own matmul, so its STE may zero the gradient in place)."""
        if self.weight_range_learner is not None:
            return self.weight_range_learner(self.weight)
        if torch.compiler.is_compiling():
            use_cache = self._compiled_reads_cache
        else:
            use_cache = self._cache_weight
            self.refresh_weight_cache()
        if not use_cache:
            return self.weight_format.fake_quantize(self.weight)
        return self._weight_cache.apply(self.weight, grad_in_place)

    def _forward_weight(self) -> torch.Tensor:
        return self.fake_quantized_weight(grad_in_place=True) if self.fake_quant_enabled else self.weight


class FakeQuantLinear(nn.Linear, _WeightFakeQuant):
    """nn.Linear with fake-quantized weight and (optionally) fake-quantized input activations.

    Layers given the same `shared_activation` quantize an input they all read only once.
    """

    def __init__(
        self,
        linear: nn.Linear,
        weight_format: NumericFormat,
        activation_format: Optional[NumericFormat] = None,
        weight_range_learner: Optional[nn.Module] = None,
        shared_activation: Optional[SharedActivationFakeQuant] = None,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.activation_format = activation_format
        if activation_format is not None and shared_activation is None:
            shared_activation = SharedActivationFakeQuant(activation_format)
        self.activation_fake_quant = shared_activation
        self._init_weight_fake_quant(weight_format, weight_range_learner)
        self.recomputed_weights: Optional[RecomputedWeights] = None  # its block's, under recompute_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return F.linear(x, self.weight, self.bias)
        recompute_weight = torch.is_grad_enabled() and self._recomputes_weight()
        weight, weight_format = (self.weight, self.weight_format) if recompute_weight else (self._forward_weight(), None)
        group = self.recomputed_weights if recompute_weight else None
        weights = (group, self) if group is not None else None
        activation = self.activation_fake_quant
        if activation is not None and activation.recompute and torch.is_grad_enabled():
            return activation.linear(x, weight, self.bias, weight_format, weights)
        if activation is not None:
            x = activation(x)
        if recompute_weight:
            return recomputed_fake_quant_linear(x, weight, self.bias, weight_format, weights=weights)
        return F.linear(x, weight, self.bias)

    def to_float(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's parameters."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        act = self.activation_format.name if self.activation_format is not None else None
        return f"{super().extra_repr()}, weight={self.weight_format.name}, activation={act}"


class FakeQuantEmbedding(nn.Embedding, _WeightFakeQuant):
    """nn.Embedding whose table is fake-quantized (weight-only)."""

    def __init__(
        self,
        embedding: nn.Embedding,
        weight_format: NumericFormat,
        weight_range_learner: Optional[nn.Module] = None,
    ) -> None:
        nn.Module.__init__(self)
        for attr in EMBEDDING_ATTRS:
            setattr(self, attr, getattr(embedding, attr))
        self.weight = embedding.weight
        self._init_weight_fake_quant(weight_format, weight_range_learner)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._forward_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    def to_float(self) -> nn.Embedding:
        """A plain nn.Embedding sharing this module's table."""
        embedding = nn.Embedding.__new__(nn.Embedding)
        nn.Module.__init__(embedding)
        for attr in EMBEDDING_ATTRS:
            setattr(embedding, attr, getattr(self, attr))
        embedding.weight = self.weight
        return embedding

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.weight_format.name}"
