"""A frozen weight's fake-quantized cache survives optimizer steps; a trained one's is refreshed."""

import pytest
import torch
from torch import nn

from qattune.quant import QATQuantizer
from qattune.quant.modules import weight_cache


def test_frozen_weight_is_not_requantized_after_optimizer_steps(monkeypatch):
    real = weight_cache.fake_quantize_clipped
    quantized = []
    monkeypatch.setattr(weight_cache, "fake_quantize_clipped",
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


def test_large_weight_refresh_reuses_its_buffers_and_stays_exact():
    """A weight big enough for the compiled path is refreshed in place after each optimizer step: the
    same buffers, the eager fake quantization of the new weight, and STE gradients zero where clipped."""
    from qattune.quant.fake_quant import fake_quantize_ste

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256, bias=False))  # 131072 elements: the compiled path
    QATQuantizer("8da4w", quantize_output=True).prepare(model)
    layer = model[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 512)
    pointers = set()
    for _ in range(3):
        grad_out = torch.randn(8, 256)
        model(x).backward(grad_out)
        cache = layer._weight_cache
        pointers.add((cache.fake_quantized.data_ptr(), cache.clipped.data_ptr()))
        weight = layer.weight.detach().clone().requires_grad_(True)
        reference = fake_quantize_ste(weight, layer.weight_format)
        nn.functional.linear(layer.activation_fake_quant(x), reference).backward(grad_out)
        assert torch.equal(cache.fake_quantized, reference.detach())
        assert torch.equal(layer.weight.grad, weight.grad)
        assert (layer.weight.grad[cache.clipped] == 0).all() and cache.clipped.any()
        optimizer.step()
        optimizer.zero_grad()
    assert len(pointers) == 1


def test_training_steps_with_activation_quantization_free_their_autograd_graphs():
    """Each step's graph is freed after backward (a hook that referred back to its own autograd node once
    kept every step's graph alive: about 150 MB a step on SmolLM2-135M)."""
    import gc

    from qattune.models import llama

    torch.manual_seed(0)
    model = llama(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                  max_seq_len=32)
    QATQuantizer("8da4w").prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 128, (2, 16))
    objects = []
    for _ in range(8):
        model(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        gc.collect()
        objects.append(len(gc.get_objects()))
    assert objects[-1] - objects[2] <= 5  # the leak kept about 20 more objects alive every step here


@pytest.mark.parametrize("batch_size, batches", [(16, [(3, True)]), (2, [(2, True)])])
def test_weights_refresh_together_after_an_optimizer_step_and_stay_exact(monkeypatch, batch_size, batches):
    """After the first step, the large cached weights of one format and width are refreshed in one
    compiled call (batched on GPUs; here on the CPU too); each cache then holds the eager fake
    quantization of its new weight and its clipped mask."""
    from qattune.quant.modules import fused

    monkeypatch.setattr(weight_cache, "BATCHED_REFRESH_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(weight_cache, "REFRESH_BATCH", batch_size)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False),
                          nn.Linear(256, 256, bias=False))  # 131072, 131072, 65536 elements: compiled path
    model.insert(2, nn.Linear(256, 256, bias=False))  # widths 256, 512, 256, 256: batches of 3 and 1
    QATQuantizer("8da4w", quantize_output=True).prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 256)
    calls = []
    batched = fused.fake_quantize_many_into

    def counting(fmt, xs, outs, clippeds):
        done = batched(fmt, xs, outs, clippeds)
        calls.append((len(xs), done))
        return done

    weight_cache.fake_quantize_many_into, restore = counting, weight_cache.fake_quantize_many_into
    try:
        for _ in range(3):
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        model(x)  # the refresh after the last step
    finally:
        weight_cache.fake_quantize_many_into = restore
    # the first forward fills each cache's buffers one by one; then per step the three width-256 weights
    # in batches of at most `batch_size` (a batch of one, as the width-512 weight, is refreshed alone)
    assert calls == batches * 3
    for layer in model:
        x_hat, in_range = layer.weight_format.fake_quantize_with_mask(layer.weight.detach())
        assert torch.equal(layer._weight_cache.fake_quantized, x_hat)
        assert torch.equal(layer._weight_cache.clipped, ~in_range)
