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


def test_recomputed_weights_and_activations_on_cuda_give_the_stored_gradients():
    """bf16 on CUDA, activations large enough for the Triton-compiled fake quantization (forward and the
    backward's recomputation): the gradients are those of the path that stores the quantized tensors."""
    from qattune.models import llama

    torch.manual_seed(0)
    base = llama(vocab_size=256, num_layers=2, num_heads=8, num_kv_heads=4, embed_dim=512, intermediate_dim=1024,
                 max_seq_len=128).to(torch.bfloat16).cuda()
    tokens = torch.randint(0, 256, (2, 128), device="cuda")
    runs = []
    for recompute in (False, True):
        model = QATQuantizer("8da4w", recompute_weights=recompute, recompute_activations=recompute).prepare(
            copy.deepcopy(base))
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)
    for recomputed, stored in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(recomputed, stored)


@pytest.mark.parametrize("scheme", ["8da4w", "fp8", "nvfp4"])
def test_compiled_fake_quantization_called_directly_on_cuda_equals_the_cpu(scheme):
    """The first call of a signature goes through Dynamo, the next ones call its graph directly
    (`direct_call`): both equal the CPU's values and masks bit for bit."""
    from qattune.quant.modules.fused import fake_quantize_clipped

    torch.manual_seed(0)
    layer = QATQuantizer(scheme).prepare(nn.Sequential(nn.Linear(1024, 512, bias=False)))[0]
    formats = [layer.weight_format] + ([layer.activation_format] if layer.activation_format is not None else [])
    for fmt in formats:
        x = (torch.randn(512, 1024) * 3).to(torch.bfloat16)
        with torch.no_grad():
            expected = fake_quantize_clipped(fmt, x)
            for _ in range(3):
                got = fake_quantize_clipped(fmt, x.cuda())
                assert torch.equal(got[0].cpu(), expected[0])
                assert (got[1] is None and expected[1] is None) or torch.equal(got[1].cpu(), expected[1])
