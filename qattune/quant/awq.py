"""Activation-aware channel scaling before GPTQ (`quantizer.awq_scaling`).

AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration") multiplies a Linear layer's input columns by per-channel factors `s` and divides its
inputs by the same `s`, which leaves the float model unchanged. The division is folded into whatever
produces the inputs, so nothing is added to the model. Input channels that carry large activations get
larger weights, hence a larger share of their group's grid and a smaller error relative to what they
contribute. With `s = mean|x| ** alpha`, alpha is chosen per group of layers by the output error of the
rounded layers on the calibration inputs; alpha = 0 leaves the layers as they are.

In a Llama-style transformer block, four places absorb the division exactly:

- `attn_norm`'s gain, for q/k/v's inputs;
- v_proj's output rows, for o_proj's inputs. The factor of a channel is shared by the query heads that
  read the same key/value head;
- `mlp_norm`'s gain, for gate/up's inputs;
- up_proj's output rows, for down_proj's inputs (the SwiGLU product is linear in up's output).

Rows scaled as a whole (v_proj's, up_proj's) round to the same codes on proportionally scaled group
scales, so those producers lose nothing. Activation fake quantization (per token) is left out of the
search.

The error of a layer `W` [out, in] whose columns are scaled by `s` and rounded to `Q` is computed from
the calibration inputs' `H = Σ x xᵀ` as `trace(E H Eᵀ)`, where `E = W - Q / s`. The rounding is the one
the layer's learned scales start from (`LearnedRangeFakeQuantizer.fake_quantize_as_initialized`), so
the search sees the grid that GPTQ then rounds on.

Measured on SmolLM2-135M (8da4w g32, 120 QAT steps from GPTQ's start): see docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from qattune.errors import QattuneError

ALPHAS = tuple(i / 10 for i in range(11))
"""The exponents tried for `s = mean|x| ** alpha`; 0 is the unscaled layer."""


@dataclass
class _InputStats:
    """Per-channel `Σ |x|`, `H = Σ x xᵀ` and the token count of one Linear input."""

    abs_sum: Tensor
    hessian: Tensor
    tokens: int = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0)
        self.hessian.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def mean_abs(self) -> Tensor:
        return (self.abs_sum / max(self.tokens, 1)).clamp(min=1e-6)


def _rounding_error(layer: nn.Module, scale: Tensor, hessian: Tensor) -> float:
    """`Σ |(W - Q/s) x|²` over the calibration inputs for `layer`'s weight with its columns scaled by
    `scale` and rounded as its learned scales would start."""
    weight = layer.weight.detach().float()
    rounded = layer.weight_range_learner.fake_quantize_as_initialized(weight * scale)
    error = weight - rounded / scale
    return float(((error @ hessian) * error).double().sum())


def _normalise(s: Tensor) -> Tensor:
    """Centre the factors on 1 (geometric mean of the extremes), as AWQ does."""
    return s / (s.max() * s.min()).sqrt()


def _search(layers: list[nn.Module], magnitude: Tensor, hessian: Tensor,
            expand: Callable[[Tensor], Tensor]) -> tuple[float, Tensor, float, float]:
    """The alpha of least summed rounding error over `layers` (the quantized ones among a place's
    consumers); returns it, its factors `s` (one per entry of `magnitude`), its error and the unscaled
    error. `expand` spreads `s` over the layers' input channels."""
    best: Optional[tuple[float, Tensor, float]] = None
    unscaled = 0.0
    for alpha in ALPHAS:
        factors = _normalise(magnitude.pow(alpha))
        error = sum(_rounding_error(m, expand(factors), hessian) for m in layers)
        if alpha == 0.0:
            unscaled = error
        if best is None or error < best[2]:
            best = (alpha, factors, error)
    assert best is not None
    return best[0], best[1], best[2], unscaled


def _check_block(block: nn.Module) -> None:
    """Refuse blocks whose layout this scaling does not know: it must hold exactly."""
    from qattune.models.transformer import RMSNorm

    needed = ("attn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp_norm",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    modules = dict(block.named_modules())
    missing = [n for n in needed if n not in modules]
    if missing:
        raise QattuneError(f"quantizer option awq_scaling needs Llama-style transformer blocks; this block has no "
                           f"{missing[0]}: remove awq_scaling")
    for norm in ("attn_norm", "mlp_norm"):
        if type(modules[norm]) is not RMSNorm:
            raise QattuneError(f"quantizer option awq_scaling folds its factors into qattune's RMSNorm gains; {norm} "
                               f"is a {type(modules[norm]).__name__}: remove awq_scaling")


@dataclass(frozen=True)
class BlockScaling:
    """What `awq_scale_block` chose for one block: alpha and factors per place, and the layers' summed
    rounding errors before and after, in the block's original basis (the rows of v_proj and up_proj
    are divided by the next place's factors, which divides their output errors too; the next layer
    multiplies them back)."""

    alphas: dict[str, float]
    factors: dict[str, Tensor]
    error: float
    unscaled_error: float


@torch.no_grad()
def awq_scale_block(block: nn.Module, inputs: list[tuple[Any, ...]]) -> BlockScaling:
    """Scale `block`'s Linear inputs channel-wise (see the module docs), in place, from its outputs on
    `inputs` (the positional arguments of each calibration batch), and start the learned scales of its
    Linear layers again from the scaled weights. The block computes the same function in float
    afterwards (up to float rounding)."""
    _check_block(block)
    attn, mlp = block.attn, block.mlp
    places = {"qkv": attn.q_proj, "o": attn.o_proj, "gate_up": mlp.gate_proj, "down": mlp.down_proj}
    stats = {name: _InputStats(torch.zeros(m.in_features, device=m.weight.device),
                               torch.zeros(m.in_features, m.in_features, device=m.weight.device))
             for name, m in places.items()}

    def record(place: str):
        def hook(_module: nn.Module, args: tuple[Tensor, ...], _output: Tensor) -> None:
            stats[place].add(args[0])
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in places.items()]
    try:
        for args in inputs:
            block(*args)
    finally:
        for handle in handles:
            handle.remove()

    alphas: dict[str, float] = {}
    chosen_factors: dict[str, Tensor] = {}
    error = unscaled = 0.0

    def fold(place: str, consumers: list[nn.Module], magnitude: Optional[Tensor] = None,
             expand: Callable[[Tensor], Tensor] = lambda s: s) -> Tensor:
        """Choose `place`'s factors, multiply the consumers' columns by them, return them (the caller
        divides the producer)."""
        nonlocal error, unscaled
        quantized = [m for m in consumers if getattr(m, "weight_range_learner", None) is not None]
        magnitude = stats[place].mean_abs() if magnitude is None else magnitude
        if not quantized:  # nothing here is rounded: leave the place as it is
            alphas[place], chosen_factors[place] = 0.0, torch.ones_like(magnitude)
            return chosen_factors[place]
        alpha, factors, chosen, base = _search(quantized, magnitude, stats[place].hessian, expand)
        alphas[place], chosen_factors[place], error, unscaled = alpha, factors, error + chosen, unscaled + base
        for m in consumers:
            m.weight.mul_(expand(factors).to(m.weight.dtype))
        return factors

    s = fold("qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
    block.attn_norm.weight.div_(s.to(block.attn_norm.weight.dtype))

    # o_proj's input channel (query head h, dim d) is value head h // groups, dim d: one factor per
    # value channel, from the mean magnitude over the query heads that read it
    kv_heads, groups, head_dim = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim
    per_value = stats["o"].mean_abs().reshape(kv_heads, groups, head_dim).mean(1).reshape(-1)
    s = fold("o", [attn.o_proj], per_value,
             expand=lambda f: f.reshape(kv_heads, 1, head_dim).expand(-1, groups, -1).reshape(-1))
    attn.v_proj.weight.div_(s.to(attn.v_proj.weight.dtype).unsqueeze(1))
    if attn.v_proj.bias is not None:
        attn.v_proj.bias.div_(s.to(attn.v_proj.bias.dtype))

    s = fold("gate_up", [mlp.gate_proj, mlp.up_proj])
    block.mlp_norm.weight.div_(s.to(block.mlp_norm.weight.dtype))

    s = fold("down", [mlp.down_proj])
    mlp.up_proj.weight.div_(s.to(mlp.up_proj.weight.dtype).unsqueeze(1))

    for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        learner = getattr(m, "weight_range_learner", None)
        if learner is not None:
            learner.initialize(m.weight)
    return BlockScaling(alphas=alphas, factors=chosen_factors, error=error, unscaled_error=unscaled)
