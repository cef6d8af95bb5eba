"""The CUDA path of every scheme's fake quantization computes what the CPU path computes (GPU only)."""

import copy

import pytest
import torch
from torch import nn

from qattune.quant import QATQuantizer
from qattune.quant.schemes import SCHEMES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


FUSED = ["8da4w", "8w", "4w", "fp8", "nvfp4", "q4_0"]


@pytest.mark.parametrize("scheme, width, tokens", [(s, 256, 16) for s in SCHEMES] + [(s, 1024, 256) for s in FUSED])
def test_fake_quantized_layer_on_cuda_matches_cpu(scheme, width, tokens):
    """fp32 forward and backward through a prepared Linear: same output and gradients on both devices
    (quantization is elementwise and exact; only the matmul's summation order differs). Width 1024 takes
    the compiled (fused) fake quantization: Triton kernels on CUDA, C++ ones on the CPU."""
    torch.manual_seed(0)
    cpu = QATQuantizer(scheme).prepare(nn.Sequential(nn.Linear(width, width // 2, bias=False)))
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, tokens, width) * 3
    outs, grads = [], []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        xd = x.detach().to(device).requires_grad_(True)
        out = model(xd)
        (out.square().sum()).backward()
        outs.append(out.detach().cpu())
        grads.append((xd.grad.cpu(), model[0].weight.grad.cpu()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-3)
