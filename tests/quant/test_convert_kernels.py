"""PyTorch's low-precision kernels in converted Linear layers agree with the dequantize path."""

import pytest
import torch
from torch import nn

from qattune.quant import QATQuantizer, QuantizedLinear
from qattune.quant.modules import kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def converted_layer(scheme, device, in_features=128, out_features=64, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    QATQuantizer(scheme, **options).convert(model)
    return model[0].to(device)


def both_paths(layer, x):
    layer.use_kernels = False
    reference = layer(x)
    layer.use_kernels = True
    assert layer._kernel_forward(x.reshape(-1, layer.in_features)) is not None, "kernel path not taken"
    return layer(x), reference


def require(op_name):
    if not hasattr(torch, op_name):
        pytest.skip(f"torch.{op_name} is not available in this PyTorch build")


@pytest.mark.parametrize("device", DEVICES)
def test_int4_weight_only_kernel(device):
    require("_weight_int4pack_mm_for_cpu" if device == "cpu" else "_weight_int4pack_mm")
    layer = converted_layer("4w", device, group_size=32)
    x = torch.randn(3, 17, 128, device=device, dtype=torch.bfloat16)
    out, reference = both_paths(layer, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_int8_int_mm_kernel(device):
    require("_int_mm")
    layer = converted_layer("8da8w", device)
    x = torch.randn(4, 32, 128, device=device)
    out, reference = both_paths(layer, x)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    # the kernel's integer product is exact: compare against an independent int64 matmul
    xq = layer.activation_format.quantize(x.reshape(-1, 128))
    exact = (xq.codes.cpu().long() @ layer.weight_packed.cpu().long().t()).double()  # int64 mm: CPU only
    expected = exact * xq.scale.cpu().double() * layer.weight_scale.cpu().double().t() + layer.bias.cpu().double()
    torch.testing.assert_close(out.reshape(-1, 64).cpu().double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_scaled_mm_kernel(device):
    require("_scaled_mm")
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 _scaled_mm needs compute capability 8.9+")
    layer = converted_layer("fp8", device)
    # CUDA's kernel writes bf16 with row-wise scales: it serves bf16 activations, fp32 ones dequantize
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(2, 16, 128, device=device, dtype=dtype)
    try:
        out, reference = both_paths(layer, x)
    except RuntimeError as err:  # a build without an FP8 GEMM for this device
        pytest.skip(f"torch._scaled_mm unavailable here: {err}")
    tolerance = 1e-2 if device == "cuda" else 1e-5
    torch.testing.assert_close(out.float(), reference.float(), rtol=tolerance, atol=tolerance)
    if device == "cuda":
        assert layer._kernel_forward(x.float().reshape(-1, 128)) is None


def test_kernels_decline_unsupported_inputs():
    # devices without the ops (MPS; meta stands in for it here) fall back to the dequantize path
    codes8 = torch.zeros(32, 32, dtype=torch.int8, device="meta")
    scales = torch.ones(32, 1, device="meta")
    assert kernels.int8_mm(codes8, scales, codes8, scales, torch.float32) is None
    assert kernels.fp8_scaled_mm(codes8, scales, codes8, scales, torch.float32) is None
    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    assert kernels.int4_pack_for_kernel(codes) is not None
    assert kernels.int4_kernel_dtype(torch.randn(4, 128, dtype=torch.float64), 32) is None
    # fp32/fp16 dequantize: the CPU kernel takes them, but 40 ms against 0.3 ms in bf16 (576 x 1536, 32 rows)
    assert kernels.int4_kernel_dtype(torch.randn(4, 128), 32) is None
    assert kernels.int4_kernel_dtype(torch.randn(4, 128, dtype=torch.float16), 32) is None
    assert kernels.int4_kernel_dtype(torch.randn(4, 128, dtype=torch.bfloat16), 32) == torch.bfloat16
    assert kernels.int4_kernel_dtype(torch.randn(4, 128), 48) is None  # tinygemm groups: 32, 64, 128, 256
    layer = converted_layer("4w", "cpu", group_size=32)
    assert isinstance(layer, QuantizedLinear)
    layer.use_kernels = True
    out = layer(torch.randn(2, 128, dtype=torch.float64))  # falls back to the dequantize path
    assert out.dtype == torch.float64
