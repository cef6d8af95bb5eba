"""A fake-quantized Linear whose backward recomputes the fake-quantized weight instead of keeping it.

`F.linear(x, fake_quantize(w), b)` makes autograd keep the fake-quantized weight until the backward, and
the weight cache keeps it between steps: one extra copy of every weight, which is most of QAT's memory
over float training on a GPU (docs/benchmarks.md). `recomputed_fake_quant_linear` saves the float weight
instead (a parameter, held anyway) and quantizes it again in the backward, with its clipped mask for the
straight-through gradient. The gradients are those of the cached path: the same matmuls on the same
values. It costs one more fake quantization per layer and step, and one per micro-batch in the forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from qattune.quant.formats import NumericFormat
from qattune.quant.modules.fused import fake_quantize_clipped


class _RecomputedFakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], fmt: NumericFormat) -> Tensor:  # type: ignore[override]
        weight_hat, _ = fake_quantize_clipped(fmt, weight.detach())
        ctx.fmt, ctx.has_bias = fmt, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight_hat, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        with torch.no_grad():
            weight_hat, clipped = fake_quantize_clipped(ctx.fmt, weight.detach())
        # matmuls in the gradient's dtype (the forward's under autocast), results in the inputs' dtypes
        grad_x = grad.matmul(weight_hat.to(grad.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_2d.t().mm(x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(weight.dtype)
            if clipped is not None:
                grad_w.masked_fill_(clipped, 0.0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b, None


def recomputed_fake_quant_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], fmt: NumericFormat) -> Tensor:
    """`F.linear(x, fmt.fake_quantize(weight), bias)` with the straight-through gradient to `weight`,
    keeping only `x` and `weight` for the backward."""
    return _RecomputedFakeQuantLinear.apply(x, weight, bias, fmt)
