"""Range learning: an integer fake quantizer whose scale (and zero point) are trained, LSQ-style.

The scale (and, for asymmetric formats, the zero point) are `nn.Parameter`s initialised from the first
tensor the module sees: with the format's own dynamic qparams (`init="absmax"`, so training starts
exactly at dynamic fake quantization), with the smallest grid whose end codes hold each group's
extremes (`init="cover"`, see `IntAffine.covering_qparams`), or with the clipping range of least squared
error per group (`init="mse"`, see `search_clipping_qparams`). The format is an integer grid
(`IntAffine`, or a format's `learnable_grid()` such as Q4_0's), whose scale may be negative (Q4_0's is
for about half its blocks).

Gradients (Esser et al. 2020, "Learned Step Size Quantization"; zero point as in LSQ+, Bhalgat et al.
2020), with `v = x / s`, `r = round(v)`, `z` the rounded zero point:

- input: the straight-through estimator, 1 where `qmin <= r + z <= qmax`, else 0;
- scale: `r - v` in range, `qmin - z` / `qmax - z` where clipped below / above;
- zero point: 0 in range, `-s` where clipped;

both parameter gradients summed over the elements sharing the parameter and multiplied by
`1 / sqrt(n * p)`, where `n` is the number of elements that share one scale (the whole tensor for a
per-tensor scale, as in the LSQ paper; the group for per-group scales) and `p` the number of positive
levels (`qmax`, less the mid-point on a symmetric unsigned grid such as Q4_0's).

`quantize(x)` quantizes with the learned parameters, so `convert` reproduces what was trained.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from qattune.errors import QattuneError
from qattune.quant.formats.base import QuantizedTensor
from qattune.quant.formats.int_affine import IntAffine

MIN_LEARNED_SCALE = 1e-9
"""The smallest magnitude a learned scale computes with (its sign is kept)."""
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))
"""Range shrink factors `search_clipping_qparams` tries: 1.0 (the full range) down to 0.6."""
RANGE_INITS = ("absmax", "cover", "mse")


def _nonzero(scale: Tensor) -> Tensor:
    """`scale` with magnitudes below MIN_LEARNED_SCALE raised to it, keeping the sign."""
    return torch.where(scale < 0, scale.clamp(max=-MIN_LEARNED_SCALE), scale.clamp(min=MIN_LEARNED_SCALE))


def _grid_qparams(fmt: IntAffine, scale: Tensor, zero: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """The scale and zero point a learned-range quantizer computes with: the scale kept off zero and
    on the format's grid, the zero point clamped to the codes and rounded."""
    s = fmt.grid_scale(_nonzero(scale.float()))
    return s, None if zero is None else zero.float().clamp(fmt.qmin, fmt.qmax).round()


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def search_clipping_qparams(fmt: IntAffine, x: Tensor, ratios: Sequence[float] = CLIP_RATIOS
                            ) -> tuple[Tensor, Optional[Tensor]]:
    """Per group, the qparams of `fmt.choose_qparams(x * r)` for the ratio `r` in `ratios` whose fake
    quantization of `x` has the least squared error: clipping a group's few largest values buys a
    finer grid for all the others. Least weight error is not least model error: 8da4w PTQ of
    SmolLM2-135M with these scales has held-out perplexity 25.2 against 27.2 with the full range, but
    13.75 against 13.20 after a fine-tune, where QAT starting from them also ended worse
    (docs/benchmarks.md)."""
    xf = x.float()
    best_scale, best_zero, best_error = None, None, None
    for ratio in ratios:
        scale, zero = fmt.choose_qparams(xf * ratio)
        x_hat, _ = fmt.fake_quantize_with_qparams(xf, scale, zero)
        error = fmt.blocks((xf - x_hat).square()).sum(dim=-1).reshape(scale.shape)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


class _LSQFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, scale: Tensor, zero: Optional[Tensor], fmt: IntAffine, grad_factor: float
    ) -> Tensor:
        s, z = _grid_qparams(fmt, scale, zero)
        x_hat, _ = fmt.fake_quantize_with_qparams(x, s, z)
        ctx.fmt, ctx.grad_factor = fmt, grad_factor
        ctx.save_for_backward(x, s, z)
        return x_hat

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, s, z = ctx.saved_tensors
        fmt: IntAffine = ctx.fmt
        xb = fmt.blocks(x).float()
        gb = fmt.blocks(grad).float()
        sb = s.reshape(*xb.shape[:-1], 1)
        zb = 0.0 if z is None else z.reshape(sb.shape)
        v = xb * (1.0 / sb)
        r = torch.round(v)
        below = r + zb < fmt.qmin
        above = r + zb > fmt.qmax
        clipped = below | above
        grad_x = (grad * (~clipped).reshape(x.shape)) if ctx.needs_input_grad[0] else None
        ds = torch.where(below, fmt.qmin - zb, torch.where(above, fmt.qmax - zb, r - v))
        grad_scale = (gb * ds).sum(dim=-1).reshape(s.shape) * ctx.grad_factor
        grad_zero = None
        if z is not None and ctx.needs_input_grad[2]:
            grad_zero = (gb * torch.where(clipped, -sb, 0.0)).sum(dim=-1).reshape(z.shape) * ctx.grad_factor
        return grad_x, grad_scale, grad_zero, None, None


class LearnedRangeFakeQuantizer(nn.Module):
    """Fake-quantize tensors of a fixed `shape` with an `IntAffine` format and learned qparams.

    For weights pass the weight's shape; for activations use a per-tensor format
    (`IntAffine(..., group_size=None, per_tensor=True)`), since per-token scales change with the batch.
    The parameters start at 1 (scale) / 0 (zero point) and are overwritten from the first input, as
    `init` says ("absmax": the format's dynamic qparams; "mse": `search_clipping_qparams`);
    `initialized` (a buffer) records that, so a loaded checkpoint keeps its learned values.
    """

    def __init__(self, fmt: IntAffine, shape: Sequence[int], init: str = "absmax") -> None:
        super().__init__()
        if not isinstance(fmt, IntAffine):
            raise QattuneError(f"range learning supports integer grids only, got {fmt.name!r}")
        if init not in RANGE_INITS:
            raise QattuneError(f"range_init={init!r} is not one of {', '.join(RANGE_INITS)}")
        self.fmt = fmt
        self.init = init
        scale_shape = fmt.scale_shape(tuple(shape))
        self.scale = nn.Parameter(torch.ones(scale_shape))
        self.learns_zero = not fmt.symmetric
        if self.learns_zero:
            self.zero_point = nn.Parameter(torch.zeros(scale_shape))
        elif fmt.signed:
            self.zero_point = None
        else:  # symmetric unsigned: the fixed mid-point
            self.register_buffer("zero_point", torch.full(scale_shape, float(fmt.mid_point)))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False
        n_per_scale = math.prod(shape) // math.prod(scale_shape)
        positive_levels = fmt.qmax - fmt.mid_point if fmt.symmetric else fmt.qmax
        self.grad_factor = 1.0 / math.sqrt(n_per_scale * positive_levels)

    def _check_shape(self, x: Tensor, scale: Optional[Tensor] = None) -> None:
        scale = self.scale if scale is None else scale
        if self.fmt.scale_shape(x.shape) != tuple(scale.shape):
            raise QattuneError(
                f"learned-range quantizer built for scales of shape {tuple(scale.shape)} got a tensor of "
                f"shape {tuple(x.shape)}; use a per-tensor format for activations whose shape changes"
            )

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the parameters from `x`: its dynamic qparams (torchao's choose_qparams), with
        `init="cover"` the smallest grid whose end codes hold each group's extremes, or with
        `init="mse"` the clipping range of least squared error per group.

        `x` may be an FSDP2 weight shard (a DTensor sharded on rows, like the scales): each rank then
        sets its own rows of the scales from its own rows of the weight, which is exact since every
        group lies within one row. Call it outside the forward: FSDP2 drops writes to the gathered copy.
        """
        x, scale = _local(x), _local(self.scale)
        self._check_shape(x, scale)
        new_scale, zero = self._initial_qparams(x)
        scale.copy_(_nonzero(new_scale))
        if self.learns_zero:
            _local(self.zero_point).copy_(zero)
        self.initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def _initial_qparams(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if self.init == "mse":
            return search_clipping_qparams(self.fmt, x)
        if self.init == "cover":
            return self.fmt.covering_qparams(x)
        return self.fmt.choose_qparams(x)

    @torch.no_grad()
    def fake_quantize_as_initialized(self, x: Tensor) -> Tensor:
        """`x` fake-quantized with the qparams `initialize(x)` would set (the parameters are not touched):
        what a weight would round to if the scales started from it."""
        self._check_shape(x)
        x_hat, _ = self.fmt.fake_quantize_with_qparams(x, *_grid_qparams(self.fmt, *self._initial_qparams(x)))
        return x_hat

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def effective_qparams(self) -> tuple[Tensor, Optional[Tensor]]:
        """The scale and integral zero point the forward uses (kept off zero, on the format's grid,
        rounded), detached."""
        zero = None if self.zero_point is None else self.zero_point.detach()
        return _grid_qparams(self.fmt, self.scale.detach(), zero)

    def forward(self, x: Tensor) -> Tensor:
        if not self._initialized:
            self.initialize(x)
        self._check_shape(x)
        return _LSQFakeQuantize.apply(x, self.scale, self.zero_point, self.fmt, self.grad_factor)

    def quantize(self, x: Tensor) -> QuantizedTensor:
        """Quantize `x` with the learned scale / zero point (what `convert` should store)."""
        if not self._initialized:
            raise QattuneError("learned-range quantizer was never run or loaded: it has no learned scale yet")
        self._check_shape(x)
        scale, zero = self.effective_qparams()
        return self.fmt.quantize_with_qparams(x, scale, zero)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt!r}, scale_shape={tuple(self.scale.shape)}, init={self.init}"


def range_learning_param_groups(model: nn.Module, lr: float) -> list[dict]:
    """Optimizer parameter groups: the learned ranges (scales, zero points) at `lr`, every other
    trainable parameter at the optimizer's own learning rate.

    Adam-style optimizers move a parameter by about the learning rate per step whatever its size. A
    scale is small (an int4 group's is its largest magnitude / 7.5) and moves every grid point of its
    group at once, so at the weights' rate it changes far too fast; about 1/100 of it measured best
    (docs/benchmarks.md).
    """
    learned = {id(p) for m in model.modules() if isinstance(m, LearnedRangeFakeQuantizer)
               for p in m.parameters() if p.requires_grad}
    if not learned:
        raise QattuneError("range_learning_lr is set but the model has no learned ranges; set "
                           "quantizer.range_learning=true or remove range_learning_lr")
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if id(p) not in learned]},
            {"params": [p for p in trainable if id(p) in learned], "lr": lr}]
