"""MX and NVFP4 codes and scales equal torchao's `prototype.mx_formats` bit for bit (skipped without torchao).

Optional test dependency: `pip install torchao==0.15.0`.
"""

import pytest
import torch

from qattune.quant.formats import NVFP4, MXFormat, unpack_uint4

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402


def _input(dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 256) * torch.logspace(-3, 3, 8)[:, None]
    x[0, :32] = 0.0
    x[1, 5] = 1e4
    x[2, 64:96] = torch.tensor([3.9] + [0.7] * 31)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("element", ["fp8_e4m3", "fp4_e2m1"])
def test_mx_equals_torchao_floor_mode(dtype, element):
    x = _input(dtype)
    elem_dtype = torch.float8_e4m3fn if element == "fp8_e4m3" else torch.float4_e2m1fn_x2
    scale, data = mx_tensor.to_mx(x, elem_dtype, 32, ScaleCalculationMode.FLOOR)
    q = MXFormat(element).quantize(x)
    assert torch.equal(scale.view(torch.uint8).reshape(q.scale.shape), q.scale)  # E8M0 biased exponents
    if element == "fp8_e4m3":
        assert torch.equal(data.view(torch.uint8), q.codes.view(torch.uint8))
    else:
        assert torch.equal(unpack_uint4(data.view(torch.uint8)), q.codes)  # same nibble order as pack_uint4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_equals_torchao_two_level_scaling(dtype):
    x = _input(dtype)
    tensor_scale = nvfp4_tensor.per_tensor_amax_to_scale(x.float().abs().amax())
    block_scales, data = nvfp4_tensor.nvfp4_quantize(x, 16, tensor_scale)
    q = NVFP4().quantize(x)
    assert q.global_scale.item() == tensor_scale.item()
    assert torch.equal(block_scales.view(torch.uint8).reshape(q.scale.shape), q.scale.view(torch.uint8))
    assert torch.equal(unpack_uint4(data), q.codes)
