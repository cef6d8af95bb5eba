"""Block reconstruction after GPTQ (`quantizer.reconstruction_epochs`).

GPTQ rounds a transformer block's Linear weights one layer at a time, each against its own float
outputs. Block reconstruction then trains the block's latent weights as a whole, with the block's fake
quantization on (weights on their fixed learned grids, activations too), so that the block's outputs
match the float block's on the same inputs: the calibration batches, as they leave the earlier blocks
already rounded (BRECQ, Li et al. 2021; EfficientQAT's block-wise stage, Chen et al. 2024, here on
GPTQ's start). Only the latents move, and by little (Adam at a small learning rate, a cosine schedule,
one or two passes over the calibration batches): the fixed scales, the norms and everything outside the
block stay as they are. The next block is then calibrated (GPTQ's Hessians) and trained on this block's
outputs with its fake quantization on, weights and activations, as the quantized model computes them
(`fake_quantized_outputs`).

The loss is the squared error per hidden channel divided by that channel's mean square over the
calibration tokens, so every channel of the residual stream counts alike. With the float *model's*
hidden state as the target instead (asking each block to make up for the earlier blocks' errors),
every loss tried broke SmolLM2-135M (docs/benchmarks.md).

Measured on SmolLM2-135M (8da4w, docs/benchmarks.md): the blocks' output error falls to 0.6-0.8x
GPTQ's. Before 120 QAT steps it measured within noise. At the end of the float phase of
`smollm2/135M_qat_gptq` (90 float steps, then 30 fake-quantized), one pass at 5e-5 raised the share of
PTQ's held-out perplexity loss recovered from 84.6% to 89.5% on three topics over five seeds, so that
config turns it on.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor, nn

DEFAULT_LR = 5e-5


def _channel_weights(targets: list[Tensor]) -> Tensor:
    """1 / (each hidden channel's mean square over every target token)."""
    total = sum(t.detach().float().pow(2).reshape(-1, t.shape[-1]).sum(0) for t in targets)
    count = sum(t.numel() // t.shape[-1] for t in targets)
    return (total / count).clamp(min=1e-12).reciprocal()


def _error(output: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    return ((output.float() - target.float()).pow(2) * weights).mean()


@contextlib.contextmanager
def _training_only(block: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Within the block, only `params` require grad (so no gradient reaches the scales or the norms);
    gradients are cleared on the way out."""
    trained = {id(p) for p in params}
    everything = list(block.parameters())
    flags = [p.requires_grad for p in everything]
    for p in everything:
        p.requires_grad_(id(p) in trained)
    try:
        yield
    finally:
        for p, flag in zip(everything, flags):
            p.requires_grad_(flag)
            p.grad = None


@contextlib.contextmanager
def _fake_quantized(block: nn.Module) -> Iterator[None]:
    """Within the block, every fake-quantized module computes fake-quantized (the flags are restored)."""
    modules = [m for m in block.modules() if hasattr(m, "fake_quant_enabled")]
    was = [m.fake_quant_enabled for m in modules]
    for m in modules:
        m.fake_quant_enabled = True
    try:
        yield
    finally:
        for m, enabled in zip(modules, was):
            m.fake_quant_enabled = enabled


def fake_quantized_outputs(block: nn.Module, inputs: list[tuple[Any, ...]]) -> list[Tensor]:
    """The block's outputs with its fake quantization on (weights and activations), as the quantized
    model computes them: what the next block is calibrated and trained on after reconstruction."""
    with _fake_quantized(block), torch.no_grad():
        return [block(*args) for args in inputs]


class Reconstruction(NamedTuple):
    before: float  # mean channel-weighted output error before training
    after: float  # ... after it (equal to `before` when undone)
    undone: bool  # training made the error worse, so the latents were put back


def reconstruct_block(block: nn.Module, inputs: list[tuple[Any, ...]], targets: list[Tensor],
                      latents: list[nn.Parameter], *, epochs: int, lr: float = DEFAULT_LR,
                      seed: int = 0) -> Reconstruction:
    """Train `latents` (the block's rounded Linear weights) for `epochs` passes over `inputs` (the
    block's positional arguments per batch), with the block's fake quantization on, towards `targets`
    (the float block's output for each input); if that leaves the error higher (a learning rate too
    high), the latents are put back as they were. The batch order is drawn from `seed`."""
    weights = _channel_weights(targets)

    def mean_error() -> float:
        with torch.no_grad():
            return sum(float(_error(block(*args), target, weights)) for args, target in zip(inputs, targets)) / len(inputs)

    with _fake_quantized(block):
        before = mean_error()
        if epochs <= 0 or not latents:
            return Reconstruction(before, before, False)
        start = [latent.detach().clone() for latent in latents]
        steps = epochs * len(inputs)
        optimizer = torch.optim.Adam(latents, lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        order = torch.Generator().manual_seed(seed)
        with _training_only(block, latents), torch.enable_grad():
            for _ in range(epochs):
                for i in torch.randperm(len(inputs), generator=order).tolist():
                    loss = _error(block(*inputs[i]), targets[i], weights)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        after = mean_error()
        if after <= before:
            return Reconstruction(before, after, False)
        with torch.no_grad():
            for latent, value in zip(latents, start):
                latent.copy_(value)
        return Reconstruction(before, before, True)
