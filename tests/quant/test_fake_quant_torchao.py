"""8da4w numerics equal torchao's QAT fake quantizers bit for bit (skipped when torchao is absent).

Optional test dependency: `pip install torchao==0.15.0` (pure-Python use; its C++ extensions are not needed).
"""

import pytest
import torch

from qattune.quant.formats import IntAffine

qat = pytest.importorskip("torchao.quantization.qat")


def _fake_quantizers():
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    weight = IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True))
    activation = IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))
    return weight, activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8da4w_weight_and_activation_fake_quant_match_torchao(dtype):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.rand(64, 1) * 0.1
    w[0, :32] = 0.0
    w[1, 5] = 50.0
    a = torch.randn(2, 8, 128) + torch.rand(2, 8, 1) * 4
    a[0, 0] = 0.0
    a[0, 1] = a[0, 1].abs()
    a[1, 3] = -a[1, 3].abs()
    weight_fq, act_fq = _fake_quantizers()
    cases = ((weight_fq, IntAffine(4, True, 32), w.to(dtype)), (act_fq, IntAffine(8, False, None), a.to(dtype)))
    for theirs, ours, x in cases:
        x_theirs = x.clone().requires_grad_(True)
        x_ours = x.clone().requires_grad_(True)
        y_theirs, y_ours = theirs(x_theirs), ours.fake_quantize(x_ours)
        assert y_ours.dtype == y_theirs.dtype == dtype
        assert torch.equal(y_ours, y_theirs)
        y_theirs.sum().backward()
        y_ours.sum().backward()
        assert torch.equal(x_ours.grad != 0, x_theirs.grad != 0)  # same clipped elements
        assert torch.equal(theirs.scale.reshape(-1), ours.quantize(x).scale.reshape(-1))


def test_4w_codes_equal_torchao_int4_weight_only_qat():
    """torchao's `4w` QAT dequantizes with float32 scale/zero; qattune stores them in bf16 (the kernel's
    layout), so compare the codes: ours, dequantized with the float32 parameters, give torchao's output."""
    from torchao.quantization.qat.fake_quantize_config import Int4WeightFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import Int4WeightFakeQuantizer

    from qattune.quant.formats import Int4Tinygemm

    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.rand(16, 1)
    w[0, :128] = 0.5
    theirs = Int4WeightFakeQuantizer(Int4WeightFakeQuantizeConfig(group_size=128, activation_dtype=torch.bfloat16))(w)
    codes = Int4Tinygemm(128).quantize(w).codes.float().reshape(16, 2, 128)
    groups = w.reshape(16, 2, 128)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / 15
    assert torch.equal(((codes - 8) * scale + (lo + 8 * scale)).reshape(w.shape), theirs)
