"""GPTQ rounding as QAT's starting point (`quantizer.rounding_init: gptq`).

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") rounds a Linear weight one input column at a time and spreads each column's rounding error
over the columns not yet rounded, through the inverse of the Hessian `H = 2 Σ x xᵀ` of the layer's inputs
on calibration tokens, so that the layer's outputs, not its weights, stay close to the float ones. With
`act_order` the columns go in order of decreasing `H[i, i]` (the inputs with the most energy first).
The group scales are fixed beforehand (they are range learning's parameters), so every group keeps its
grid whatever the column order.

For QAT the result becomes the *starting latent weights*: each weight is set to its error-compensated
value just before it was rounded (so nearest rounding gives GPTQ's code, and training starts from GPTQ's
model), not to the code itself. A latent on a grid point sits in the middle of its rounding bin, half a
step from either boundary, and fine-tuning's small updates then never change a code: QAT from such a
start ended worse than plain PTQ (held-out perplexity 14.2 against 13.2, docs/benchmarks.md). The
error-compensated values are spread over their bins like ordinary weights, so training moves codes as
usual.

Calibration runs block by block, as GPTQ does: the inputs of the first transformer block are captured
once; each block's Linear inputs are accumulated into Hessians, its layers are rounded, and its outputs
with the rounded weights become the next block's inputs (with `reconstruction_epochs`, the block is then
trained towards its float outputs, and its fully fake-quantized outputs go on: `block_reconstruction`).
Blocks are read from `model.layers` and called as `block(hidden, *rest)`.

With `round_output_head`, the output head (`model.output`, read through the final norm `model.norm`) is
rounded last, calibrated on the last block's outputs. A head tied to the token embedding shares its
latent weight, so the embedding moves to the error-compensated values too (on SmolLM2-135M by a fifth
of a grid step on average, 10% of the table's norm). There, with 8da4w, the head's output error fell
to 0.14-0.16x nearest rounding's, and AWQ + GPTQ of a float fine-tune, no training, recovered 80% of
PTQ's held-out loss instead of 66% (five seeds, docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from qattune.data.collate import MODEL_INPUT_KEYS
from qattune.errors import QattuneError
from qattune.quant.awq import awq_scale_block
from qattune.quant.block_reconstruction import DEFAULT_LR as RECONSTRUCTION_LR, fake_quantized_outputs, reconstruct_block
from qattune.quant.calibration import InputStats
from qattune.quant.formats.elements import reciprocal

DEFAULT_DAMP = 0.01
"""Added to the Hessian's diagonal, as a share of its mean (GPTQ's `percdamp`)."""
DEFAULT_BLOCK_SIZE = 128
"""Columns rounded together before their error is passed on to the rest (GPTQ's lazy batch updates)."""
LATENT_MARGIN = 0.49
"""How far past the end codes (in steps) a latent may lie: inside the outermost bins, never clipped."""


@dataclass(frozen=True)
class GPTQReport:
    """What `gptq_initialize` did: layers rounded, layers left to nearest rounding (and why), the
    calibration tokens, and the layers' summed output error relative to nearest rounding's."""

    layers: int
    skipped: dict[str, str]
    tokens: int
    seconds: float
    error_ratio: float
    reconstruction_ratio: Optional[float] = None
    """The blocks' fake-quantized output error after block reconstruction, relative to before it."""
    reconstruction_undone: int = 0
    """Blocks whose reconstruction raised their error, and which kept GPTQ's rounding."""
    awq_ratio: Optional[float] = None
    """With AWQ scaling: the layers' output error with nearest rounding of the scaled weights, relative
    to nearest rounding of the weights as loaded. `error_ratio` is then relative to the latter too
    (v_proj's and up_proj's output errors counted on their scaled rows, as GPTQ rounds them)."""
    head_error_ratio: Optional[float] = None
    """With `round_output_head`: the head's output error with GPTQ's rounding, relative to nearest
    rounding's (not part of `error_ratio`, which is the blocks')."""
    head_tied: bool = False
    """The rounded head shares its weight with the token embedding, which moved with it."""

    def __str__(self) -> str:
        skipped = "".join(f"\n  kept nearest rounding: {name} ({why})" for name, why in self.skipped.items())
        scaled = "" if self.awq_ratio is None else f" (AWQ scaling alone: {self.awq_ratio:.2f}x)"
        reconstructed = ("" if self.reconstruction_ratio is None else
                         f"; block reconstruction: blocks' output error {self.reconstruction_ratio:.2f}x GPTQ's")
        if self.reconstruction_undone:
            reconstructed += (f" ({self.reconstruction_undone} block(s) kept GPTQ's rounding: training raised their "
                              "error; lower quantizer.reconstruction_lr)")
        head = "" if self.head_error_ratio is None else f"; output head: {self.head_error_ratio:.2f}x" + (
            " (tied: the token embedding moved with it)" if self.head_tied else "")
        return (f"GPTQ rounding: {self.layers} layers from {self.tokens:,} calibration tokens in "
                f"{self.seconds:.0f} s; output error {self.error_ratio:.2f}x nearest rounding's{scaled}{reconstructed}"
                f"{head}{skipped}")


def _codes(w: Tensor, scale: Tensor, zero: Optional[Tensor], qmin: int, qmax: int) -> Tensor:
    """The codes `IntAffine` gives (it multiplies by the scale's reciprocal, as torchao does)."""
    q = torch.round(w * reciprocal(scale))
    return (q if zero is None else q + zero).clamp(qmin, qmax)


def _dequantize(codes: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
    return (codes if zero is None else codes - zero) * scale


def _columns(qparam: Optional[Tensor], out_features: int, in_features: int) -> Optional[Tensor]:
    """A per-group (or per-channel) qparam [out, groups] spread to one value per weight [out, in]."""
    if qparam is None:
        return None
    per_row = qparam.reshape(out_features, -1)
    return per_row.repeat_interleave(in_features // per_row.shape[1], dim=1)


@torch.no_grad()
def gptq_latents(weight: Tensor, hessian: Tensor, scale: Tensor, zero: Optional[Tensor], qmin: int, qmax: int,
                 *, damp: float = DEFAULT_DAMP, act_order: bool = False,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> Tensor:
    """Latent weights whose nearest rounding is GPTQ's rounding of `weight` [out, in].

    `hessian` [in, in] is `Σ x xᵀ` over calibration inputs (any positive factor); `scale` / `zero` are
    the fixed per-group (or per-channel) qparams, of shape [out, groups] or anything reshaping to it, the
    group being `in / groups` consecutive input columns; codes are `clamp(round(w / s) + z, qmin, qmax)`
    (a scale may be negative, as Q4_0's are).
    Computed in float32 (float64 for a float64 weight; the Hessian's inverse in float64) on the weight's
    device; returns `weight`'s dtype.
    """
    out_features, in_features = weight.shape
    work = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(work).clone()
    s = _columns(scale.to(work), out_features, in_features)
    z = _columns(None if zero is None else zero.to(work), out_features, in_features)
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # inputs never seen: their columns are rounded without passing error on
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features, device=h.device)
    w, s, h = w[:, order], s[:, order], h[order][:, order]
    z = None if z is None else z[:, order]
    h += damp * torch.diag(h).mean() * torch.eye(in_features, dtype=h.dtype, device=h.device)
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        upper = torch.linalg.cholesky(inverse, upper=True).to(work)
    except torch.linalg.LinAlgError as error:
        raise QattuneError(f"GPTQ: the calibration Hessian is not positive definite even with damp={damp}; "
                           "give more calibration batches (quantizer.gptq_batches)") from error
    latent = torch.empty_like(w)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        errors = torch.empty(out_features, end - start, dtype=w.dtype, device=w.device)
        for i in range(start, end):
            column, step = w[:, i], s[:, i]
            zi = None if z is None else z[:, i]
            latent[:, i] = column
            rounded = _dequantize(_codes(column, step, zi, qmin, qmax), step, zi)
            error = (column - rounded) / upper[i, i]
            w[:, i:end] -= error.unsqueeze(1) * upper[i, i:end].unsqueeze(0)
            errors[:, i - start] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    at_qmin = _dequantize(torch.full_like(s, qmin - LATENT_MARGIN), s, z)
    at_qmax = _dequantize(torch.full_like(s, qmax + LATENT_MARGIN), s, z)  # below at_qmin where s < 0
    lowest, highest = torch.minimum(at_qmin, at_qmax), torch.maximum(at_qmin, at_qmax)
    latent = torch.minimum(torch.maximum(latent, lowest), highest)  # clipped codes keep their gradient
    return _stored(latent, s, z, weight.dtype)[:, torch.argsort(order)]


def _stored(latent: Tensor, scale: Tensor, zero: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """`latent` in `dtype` (bf16, fp16: the model's) still rounding to GPTQ's codes: a value the cast
    moved into another bin, or past the end codes, is stored as its bin's centre instead. (Where the
    dtype has no value inside a bin at all, as bf16 near an 8-bit grid's ends, the nearest one stays.)"""
    stored = latent.to(dtype)
    if dtype == latent.dtype:
        return stored

    def unclamped_codes(w: Tensor) -> Tensor:
        q = torch.round(w * reciprocal(scale))
        return q if zero is None else q + zero

    codes = unclamped_codes(latent)
    moved = unclamped_codes(stored.to(latent.dtype)) != codes
    return torch.where(moved, _dequantize(codes, scale, zero).to(dtype), stored)


def output_error(weight: Tensor, rounded: Tensor, hessian: Tensor) -> float:
    """`Σ over calibration inputs of |(W - Q) x|²` = trace((W - Q) H (W - Q)ᵀ)."""
    delta = (weight.float() - rounded.float()).double()
    return float(((delta @ hessian.double()) * delta).sum())


class _StopForward(Exception):
    pass


def _first_block_inputs(model: nn.Module, batches: Iterable[dict[str, Tensor]], input_keys: tuple[str, ...],
                        device: torch.device) -> list[tuple[Any, ...]]:
    """The positional arguments of `model.layers[0]` for each batch (the model stops there)."""
    captured: list[tuple[Any, ...]] = []

    def capture(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args)
        raise _StopForward

    handle = model.layers[0].register_forward_pre_hook(capture)
    try:
        for batch in batches:
            extras = {k: batch[k].to(device) for k in input_keys if k in batch}
            try:
                model(batch["tokens"].to(device), **extras)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


@torch.no_grad()
def gptq_initialize(model: nn.Module, batches: Iterable[dict[str, Tensor]], *,
                    input_keys: tuple[str, ...] = MODEL_INPUT_KEYS, damp: float = DEFAULT_DAMP,
                    act_order: bool = False, sequential: bool = True, awq_scaling: bool = False,
                    reconstruction_epochs: int = 0, reconstruction_lr: float = RECONSTRUCTION_LR,
                    round_output_head: bool = False, progress: bool = False) -> GPTQReport:
    """Set the latent weights of every range-learning fake-quantized Linear inside `model.layers` to
    GPTQ's (see the module docs), calibrated on `batches` (dicts with `tokens`, and the `input_keys` the
    model takes). Learned scales not yet initialised are initialised first, from the weights as they are.
    Runs in float (fake quantization off) and leaves each module's fake quantization as it found it.
    `sequential`: each block's inputs come from the blocks before it with their weights rounded (as GPTQ
    does), so a block's rounding also makes up for the earlier blocks' error; else from the float model.
    Layers outside the blocks keep nearest rounding, but for the output head with `round_output_head`
    (see the module docs; a tied head moves the token embedding with it). `awq_scaling`: once a block is
    calibrated and before it is rounded, its Linear inputs are scaled channel-wise, an exact change in
    float that lowers the rounding error (`qattune.quant.awq`). `reconstruction_epochs` > 0: after each
    block's rounding, its latents are trained towards the float block's outputs for that many passes
    over the calibration batches, at `reconstruction_lr` (`qattune.quant.block_reconstruction`).
    `progress` shows a bar over the blocks."""
    from tqdm.auto import tqdm

    from qattune.quant.modules.fake_quant import FakeQuantLinear
    from qattune.quant.quantizer import fake_quant_modules

    started = time.perf_counter()
    if not hasattr(model, "layers"):
        raise QattuneError("rounding_init=gptq needs a model whose transformer blocks are model.layers")
    targets = {name: module for name, module in model.named_modules()
               if isinstance(module, FakeQuantLinear) and getattr(module, "weight_range_learner", None) is not None}
    if not targets:
        raise QattuneError("rounding_init=gptq found no layer with learned ranges; set quantizer.range_learning=true")
    head = getattr(model, "output", None) if round_output_head else None
    if round_output_head and (head not in targets.values() or not hasattr(model, "norm")):
        raise QattuneError("gptq_output_head needs the output head (model.output, after model.norm) "
                           "fake-quantized with learned ranges, which this model's head is not (q4_0's Q8_0 head "
                           "keeps dynamic scales); set gptq_output_head=false")
    tied = _tied(model)
    skipped = {name: "its weight is tied to another module" for name, m in targets.items()
               if id(m.weight) in tied and m is not head}
    fake_quantized = fake_quant_modules(model)
    was_enabled = [m.fake_quant_enabled for m in fake_quantized]
    was_training = model.training
    for m in fake_quantized:
        m.fake_quant_enabled = False
    model.eval()
    device = next(model.parameters()).device
    gptq_error = nearest_error = 0.0
    reconstructed = [0.0, 0.0]  # the blocks' output errors before and after reconstruction
    undone = 0
    unscaled_error = scaled_error = 0.0  # nearest rounding's output error before and after AWQ scaling
    tokens = 0
    try:
        inputs = _first_block_inputs(model, batches, input_keys, device)
        if not inputs:
            raise QattuneError("rounding_init=gptq got no calibration batches; the training dataset is empty")
        tokens = sum(int(args[0].shape[0] * args[0].shape[1]) for args in inputs)
        blocks = tqdm(model.layers, desc="GPTQ rounding", unit="block", disable=not progress, dynamic_ncols=True)
        for index, block in enumerate(blocks):
            in_block = {name: m for name, m in targets.items()
                        if name.startswith(f"layers.{index}.") and name not in skipped}
            stats, outputs = _calibrate(block, inputs, in_block, keep_outputs=not sequential or reconstruction_epochs > 0)
            if awq_scaling:  # exact in float: the outputs stay, the inputs' statistics are rescaled
                scaling = awq_scale_block(block, {in_block[name]: layer_stats for name, layer_stats in stats.items()})
                unscaled_error, scaled_error = unscaled_error + scaling.unscaled_error, scaled_error + scaling.error
            for name, module in in_block.items():
                errors = _round_layer(module, stats[name].hessian, damp, act_order)
                gptq_error, nearest_error = gptq_error + errors[0], nearest_error + errors[1]
            if reconstruction_epochs > 0:
                result = reconstruct_block(block, inputs, outputs, [m.weight for m in in_block.values()],
                                           epochs=reconstruction_epochs, lr=reconstruction_lr, seed=index)
                reconstructed = [reconstructed[0] + result.before, reconstructed[1] + result.after]
                undone += result.undone
            if sequential and reconstruction_epochs > 0:
                outputs = fake_quantized_outputs(block, inputs)  # activations too, as the block was trained
            elif sequential:
                with _rounded_weights(in_block.values()):
                    outputs = [block(*args) for args in inputs]
            inputs = [(output, *args[1:]) for output, args in zip(outputs, inputs)]
        head_errors = _round_output_head(model, head, inputs, damp, act_order) if head is not None else None
    finally:
        for m, enabled in zip(fake_quantized, was_enabled):
            m.fake_quant_enabled = enabled
        model.train(was_training)
    rounded = len([n for n in targets if n.startswith("layers.") and n not in skipped]) + (head is not None)
    outside = {n: "outside the transformer blocks" for n, m in targets.items()
               if not n.startswith("layers.") and n not in skipped and m is not head}
    return GPTQReport(layers=rounded, skipped={**skipped, **outside}, tokens=tokens,
                      seconds=time.perf_counter() - started,
                      error_ratio=_ratio(gptq_error, unscaled_error if awq_scaling else nearest_error),
                      awq_ratio=_ratio(scaled_error, unscaled_error) if awq_scaling else None,
                      reconstruction_ratio=(reconstructed[1] / reconstructed[0] if reconstructed[0] > 0 else 1.0)
                      if reconstruction_epochs > 0 else None, reconstruction_undone=undone,
                      head_error_ratio=_ratio(*head_errors) if head_errors is not None else None,
                      head_tied=head is not None and id(head.weight) in tied)


def _round_output_head(model: nn.Module, head: nn.Module, last_block_outputs: list[tuple[Any, ...]],
                       damp: float, act_order: bool) -> tuple[float, float]:
    """Round `head` with GPTQ, calibrated on the final norm of the last block's outputs; returns its output
    errors with GPTQ's and nearest rounding."""
    stats = InputStats.zeros(head.in_features, head.weight.device)
    for args in last_block_outputs:
        stats.add(model.norm(args[0]))
    return _round_layer(head, stats.hessian, damp, act_order)


def _ratio(error: float, reference: float) -> float:
    return error / reference if reference > 0 else 1.0


def _calibrate(block: nn.Module, inputs: list[tuple[Any, ...]], modules: dict[str, nn.Module],
               keep_outputs: bool) -> tuple[dict[str, InputStats], list[Tensor]]:
    """Run `block` on every input: the statistics of `modules`' inputs (the Hessians `Σ x xᵀ` among
    them), and (with `keep_outputs`) the block's outputs."""
    stats = {name: InputStats.zeros(m.in_features, m.weight.device) for name, m in modules.items()}
    handles = [m.register_forward_hook(_accumulate(stats[name])) for name, m in modules.items()]
    outputs = []
    try:
        for args in inputs:
            output = block(*args)
            if keep_outputs:
                outputs.append(output)
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs


@contextlib.contextmanager
def _rounded_weights(modules: Iterable[nn.Module]):
    """Within the block, the modules compute with their rounded weights (weights only, inputs in float)."""
    latents = []
    for module in modules:
        scale, zero = module.weight_range_learner.effective_qparams()
        rounded, _ = module.weight_range_learner.fmt.fake_quantize_with_qparams(module.weight, scale, zero)
        latents.append((module, module.weight.detach().clone()))
        module.weight.copy_(rounded)
    try:
        yield
    finally:
        for module, latent in latents:
            module.weight.copy_(latent)


def _accumulate(stats: InputStats):
    def hook(_module: nn.Module, args: tuple[Tensor, ...], _output: Tensor) -> None:
        stats.add(args[0])
    return hook


def _round_layer(module: nn.Module, hessian: Tensor, damp: float, act_order: bool) -> tuple[float, float]:
    """Move `module`'s weight to GPTQ's latents; returns the layer's output errors with GPTQ's rounding
    and with nearest rounding."""
    learner = module.weight_range_learner
    if not learner.is_initialized:
        learner.initialize(module.weight)
    scale, zero = learner.effective_qparams()
    fmt = learner.fmt
    weight = module.weight.detach()
    latent = gptq_latents(weight, hessian, scale, zero, fmt.qmin, fmt.qmax, damp=damp, act_order=act_order)
    nearest, _ = fmt.fake_quantize_with_qparams(weight.float(), scale, zero)
    gptq, _ = fmt.fake_quantize_with_qparams(latent.float(), scale, zero)
    errors = output_error(weight, gptq, hessian), output_error(weight, nearest, hessian)
    module.weight.copy_(latent)
    return errors
