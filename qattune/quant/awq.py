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
the search sees the grid that GPTQ then rounds on. The statistics come from GPTQ's calibration pass and
are rescaled for GPTQ afterwards (the scaled inputs are `x / s`), so the scaling costs no pass of its own.

Measured on SmolLM2-135M (8da4w g32, 120 QAT steps from GPTQ's start; docs/benchmarks.md): nearest
rounding's output error over the blocks falls to 0.09x (GPTQ's then to 0.04x, against 0.13x without the
scaling), and QAT recovers 86.1% of PTQ's perplexity loss over three seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from qattune.errors import QattuneError
from qattune.quant.calibration import InputStats

ALPHAS = tuple(i / 10 for i in range(11))
"""The exponents tried for `s = mean|x| ** alpha`; 0 is the unscaled layer."""


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
    """What `awq_scale_block` chose for one block, per place ("qkv", "o", "gate_up", "down"): alpha, and
    the factors (one per consumer input channel; for "o" one per value channel, shared by the query
    heads that read it). `error` / `unscaled_error`: the quantized layers' summed rounding errors with
    and without the factors, each layer's measured when its place was chosen, i.e. v_proj's and
    up_proj's before their rows were divided by the next place's factors (which divides their output
    errors too, and the next layer multiplies them back)."""

    alphas: dict[str, float]
    factors: dict[str, Tensor]
    error: float
    unscaled_error: float


@torch.no_grad()
def awq_scale_block(block: nn.Module, stats: Mapping[nn.Module, InputStats]) -> BlockScaling:
    """Scale `block`'s Linear inputs channel-wise (see the module docs), in place, choosing the factors
    from `stats`, the statistics of the quantized Linear layers' inputs on the calibration batches
    (GPTQ's calibration pass). Afterwards the block computes the same function in float (up to float
    rounding), each layer's `stats` are those of its scaled inputs, and the learned scales of its
    Linear layers start again from the scaled weights. Places whose consumers are not quantized (none
    in `stats`) are left as they are."""
    _check_block(block)
    attn, mlp = block.attn, block.mlp
    alphas: dict[str, float] = {}
    chosen_factors: dict[str, Tensor] = {}
    error = unscaled = 0.0

    def fold(place: str, consumers: list[nn.Module], per_factor: Callable[[Tensor], Tensor] = lambda m: m,
             expand: Callable[[Tensor], Tensor] = lambda f: f) -> Tensor:
        """Choose `place`'s factors from its quantized consumers' statistics, multiply the consumers'
        columns by them, rescale their statistics, and return them (the caller divides the producer).
        `per_factor` maps the consumers' per-channel magnitudes to one per factor; `expand` spreads the
        factors back over the channels."""
        nonlocal error, unscaled
        quantized = [m for m in consumers if m in stats]
        if not quantized:  # nothing here is rounded: leave the place as it is
            alphas[place] = 0.0
            chosen_factors[place] = per_factor(torch.ones(consumers[0].in_features, device=consumers[0].weight.device))
            return chosen_factors[place]
        reference = stats[quantized[0]]  # the consumers share their input
        alpha, factors, chosen, base = _search(quantized, per_factor(reference.mean_abs()), reference.hessian, expand)
        alphas[place], chosen_factors[place], error, unscaled = alpha, factors, error + chosen, unscaled + base
        for m in consumers:
            m.weight.mul_(expand(factors).to(m.weight.dtype))
        for m in quantized:
            stats[m].scale_inputs(expand(factors))
        return factors

    s = fold("qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
    block.attn_norm.weight.div_(s.to(block.attn_norm.weight.dtype))

    # o_proj's input channel (query head h, dim d) is value head h // groups, dim d: one factor per
    # value channel, from the mean magnitude over the query heads that read it
    kv_heads, groups, head_dim = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim
    s = fold("o", [attn.o_proj], per_factor=lambda m: m.reshape(kv_heads, groups, head_dim).mean(1).reshape(-1),
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
