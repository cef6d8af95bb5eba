"""A frozen weight's fake-quantized cache survives optimizer steps; a trained one's is refreshed."""

import torch
from torch import nn

from qattune.quant import QATQuantizer
from qattune.quant.modules import weight_cache


def test_frozen_weight_is_not_requantized_after_optimizer_steps(monkeypatch):
    real = weight_cache.fused_fake_quantize_with_mask
    quantized = []
    monkeypatch.setattr(weight_cache, "fused_fake_quantize_with_mask",
                        lambda fmt, w: quantized.append(w.shape) or real(fmt, w))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 16, bias=False))
    QATQuantizer("8w", quantize_output=True).prepare(model)
    model[0].weight.requires_grad_(False)  # frozen base (as under LoRA)
    optimizer = torch.optim.AdamW([model[1].weight], lr=0.1)
    x = torch.randn(4, 64)
    for _ in range(3):
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    # frozen [32, 64]: once; trained [16, 32]: once per step (3 forwards after 0, 1, 2 steps)
    assert quantized.count(torch.Size([32, 64])) == 1
    assert quantized.count(torch.Size([16, 32])) == 3
    before = model(x).detach()
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # an in-place change of the frozen weight is still seen
    assert quantized.count(torch.Size([32, 64])) == 1
    after = model(x).detach()
    assert quantized.count(torch.Size([32, 64])) == 2
    # 8w is per-row symmetric: doubling the weight doubles its fake quantization exactly
    expected = nn.functional.linear(nn.functional.linear(x, model[0].weight_format.fake_quantize(model[0].weight)),
                                    model[1].weight_format.fake_quantize(model[1].weight))
    assert torch.equal(after, expected) and not torch.equal(before, after)
