"""`DirectCompiled`: repeated calls skip Dynamo and give what the compiled graph gives."""

import torch

from qattune.quant import QATQuantizer
from qattune.quant.modules import fused
from qattune.quant.modules.direct_call import DirectCompiled


def _activation_format():
    model = QATQuantizer("8da4w").prepare(torch.nn.Sequential(torch.nn.Linear(64, 64)))
    return model[0].activation_format


def test_repeated_calls_go_direct_and_equal_the_eager_numbers(monkeypatch):
    fmt = _activation_format()
    compiled = DirectCompiled(fused._fake_quantize_bytes)
    dynamo_calls = []
    through_dynamo = compiled._compiled
    monkeypatch.setattr(compiled, "_compiled", lambda *args: dynamo_calls.append(1) or through_dynamo(*args))
    torch.manual_seed(0)
    with torch.no_grad():
        for rows, dtype in ((64, torch.bfloat16), (64, torch.bfloat16), (96, torch.bfloat16), (64, torch.float32),
                            (96, torch.bfloat16), (64, torch.float32)):
            x = torch.randn(rows, 256, dtype=dtype) * 3
            x_hat, clipped = compiled(fmt, x)
            eager_x_hat, in_range = fmt.fake_quantize_with_mask(x)
            assert torch.equal(x_hat, eager_x_hat)
            assert torch.equal(clipped.view(torch.bool), ~in_range)
    assert len(dynamo_calls) == 3  # once per signature: (64, bf16), (96, bf16), (64, fp32)
    assert all(route is not None for route in compiled._direct.values()) and len(compiled._direct) == 3


def test_a_result_it_cannot_map_keeps_going_through_dynamo():
    def not_a_tuple(fmt, x):
        return x * 2

    compiled = DirectCompiled(not_a_tuple)
    x = torch.randn(8, 16)
    for _ in range(2):
        assert torch.equal(compiled(None, x), x * 2)
    assert list(compiled._direct.values()) == [None]


def test_fake_quantize_clipped_routes_large_tensors_directly():
    fmt = _activation_format()
    x = torch.randn(fused.FUSE_MIN_NUMEL // 512, 512, dtype=torch.bfloat16) * 3
    with torch.no_grad():
        first, second = fused.fake_quantize_clipped(fmt, x), fused.fake_quantize_clipped(fmt, x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    routes = fused._compiled_for(fmt)._direct
    assert any(signature[2] == tuple(x.shape) and route is not None for signature, route in routes.items())
