"""FSDP2 (one gloo rank): sharded fake-quant weights are not cached, and training matches the unsharded model."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from qattune.quant import QATQuantizer


@pytest.fixture
def single_rank_group(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_sharded_fake_quant_matches_unsharded_training(single_rank_group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    QATQuantizer("8da4w").prepare(reference)
    sharded = copy.deepcopy(reference)
    for layer in (sharded[0], sharded[2], sharded):
        fully_shard(layer)
    assert isinstance(sharded[0].weight, DTensor)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.05) for m in (reference, sharded)]
    x = torch.randn(8, 64)
    for _ in range(3):
        outputs = [m(x) for m in (reference, sharded)]
        assert torch.equal(outputs[0], outputs[1])
        assert reference[0]._cache_weight and not sharded[0]._cache_weight  # no full-size cache per rank
        assert sharded[0]._weight_cache.fake_quantized is None
        for out, optimizer in zip(outputs, optimizers):
            out.square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()


def test_fsdp2_learned_ranges_start_from_the_weights_and_train_like_unsharded(single_rank_group):
    """Turning fake quantization on initialises the learned scales between steps, on the shards: a write
    in the forward would go to FSDP's gathered copy and be lost (the scales would stay at 1)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    quantizer = QATQuantizer("8da4w", range_learning=True)
    quantizer.prepare(reference)
    quantizer.set_fake_quant(reference, False)
    sharded = copy.deepcopy(reference)
    for layer in (sharded[0], sharded[2], sharded):
        fully_shard(layer)
    for model in (reference, sharded):
        quantizer.set_fake_quant(model, True)
    learner = sharded[0].weight_range_learner
    expected_scale = reference[0].weight.detach().reshape(64, 2, 32).abs().amax(-1) / 7.5
    assert torch.allclose(learner.scale.full_tensor().detach(), expected_scale, rtol=1e-6)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01) for m in (reference, sharded)]
    x = torch.randn(8, 64)
    for _ in range(3):
        outputs = [m(x) for m in (reference, sharded)]
        assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
        for out, optimizer in zip(outputs, optimizers):
            out.square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert not torch.equal(learner.scale.full_tensor(), expected_scale)  # the scales did train
