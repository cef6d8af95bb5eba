"""`recompute_weights` / `recompute_activations`: the backward re-quantizes the weight (the input) instead
of keeping its fake-quantized copy."""

import copy

import pytest
import torch
from torch import nn

from qattune.models import llama
from qattune.quant import QATQuantizer
from qattune.quant.modules import FakeQuantLinear
from qattune.quant.modules import activation_cache, recompute
from qattune.training.blocks import compiles_fake_quant_wrong


def _model() -> nn.Module:
    torch.manual_seed(0)
    return llama(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                 max_seq_len=32)


def _saved_bytes(model: nn.Module, tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for the backward (parameters not counted: they are held anyway), and the loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens).float().logsumexp(-1).mean()
    return sum(saved.values()), loss


@pytest.mark.parametrize("scheme", ["8da4w", "4w", "q4_0"])
def test_recomputed_weights_train_exactly_like_cached_ones_and_keep_no_copy(scheme):
    base = _model()
    cached = QATQuantizer(scheme, group_size=32 if scheme == "4w" else None).prepare(copy.deepcopy(base))
    recomputed = QATQuantizer(scheme, group_size=32 if scheme == "4w" else None,
                              recompute_weights=True).prepare(copy.deepcopy(base))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (cached, recomputed)]
    tokens = torch.randint(0, 128, (2, 16))
    for step in range(3):  # weights change each step: the recomputed path must follow them
        results = []
        for model, optimizer in zip((cached, recomputed), optimizers):
            saved, loss = _saved_bytes(model, tokens)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
            results.append((saved, loss.detach(), grads))
        (saved_c, loss_c, grads_c), (saved_r, loss_r, grads_r) = results
        torch.testing.assert_close(loss_r, loss_c, rtol=0, atol=0)
        for g_r, g_c in zip(grads_r, grads_c):
            torch.testing.assert_close(g_r, g_c, rtol=1e-6, atol=1e-7)
        # the cached path keeps every quantized Linear's fake-quantized weight (4 bytes per fp32 weight)
        fq_bytes = sum(m.weight.numel() * 4 for m in recomputed.modules() if isinstance(m, FakeQuantLinear))
        assert saved_c - saved_r >= fq_bytes
    assert all(m._weight_cache.fake_quantized is None for m in recomputed.modules() if isinstance(m, FakeQuantLinear))


def test_frozen_weights_keep_their_cache_and_evaluation_needs_no_grad():
    model = QATQuantizer("8da4w", recompute_weights=True).prepare(_model())
    model.layers[0].attn.q_proj.weight.requires_grad_(False)  # a frozen base weight, as under LoRA
    tokens = torch.randint(0, 128, (1, 8))
    model(tokens).sum().backward()
    assert model.layers[0].attn.q_proj._weight_cache.fake_quantized is not None
    assert model.layers[0].attn.k_proj._weight_cache.fake_quantized is None
    reference = QATQuantizer("8da4w").prepare(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=0)


def _grads_after_one_step(model: nn.Module, tokens: torch.Tensor) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    saved, loss = _saved_bytes(model, tokens)
    loss.backward()
    return saved, loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("recompute_weights", [False, True])
def test_recomputed_activations_give_the_stored_gradients_and_keep_what_float_keeps(recompute_weights):
    """bf16, where per-token int8 clips some tokens' extremes by a code: the recomputed clipped masks must
    zero the same gradient elements as the stored ones, bit for bit."""
    base, tokens = _model().to(torch.bfloat16), torch.randint(0, 128, (2, 16))
    float_saved, _ = _saved_bytes(copy.deepcopy(base), tokens)
    runs = {}
    for recompute_activations in (False, True):
        model = QATQuantizer("8da4w", recompute_weights=recompute_weights,
                             recompute_activations=recompute_activations).prepare(copy.deepcopy(base))
        runs[recompute_activations] = _grads_after_one_step(model, tokens)
    (saved_s, loss_s, grads_s), (saved_r, loss_r, grads_r) = runs[False], runs[True]
    assert torch.equal(loss_r, loss_s)
    assert all(torch.equal(g_r, g_s) for g_r, g_s in zip(grads_r, grads_s))
    assert saved_s > saved_r  # the stored path kept clipped masks: something clipped
    if recompute_weights:
        assert saved_r == float_saved  # exactly what float training keeps
    else:  # plus the cached fake-quantized weights and their clipped masks (2 + 1 bytes per bf16 weight)
        fq_bytes = sum(m.weight.numel() * 3 for m in model.modules() if isinstance(m, FakeQuantLinear))
        assert saved_r == float_saved + fq_bytes


def test_recomputed_activations_are_quantized_once_per_input_and_freed_after_the_backward(monkeypatch):
    """q/k/v and gate/up read one input each: one quantization per input in the forward and one in the
    backward (2 layers x 4 inputs, plus the output head's), and nothing is held after the backward."""
    calls = {"forward": 0, "backward": 0}
    recomputed: list[recompute.RecomputedActivation] = []

    def counting(where, original):
        def fake_quantize_clipped(fmt, x):
            calls[where] += fmt.name == "int8_asym"
            return original(fmt, x)
        return fake_quantize_clipped

    for module, where in ((activation_cache, "forward"), (recompute, "backward")):
        monkeypatch.setattr(module, "fake_quantize_clipped", counting(where, module.fake_quantize_clipped))
    original_get = recompute.RecomputedActivation.get
    monkeypatch.setattr(recompute.RecomputedActivation, "get",
                        lambda self, fmt, x: recomputed.append(self) or original_get(self, fmt, x))
    model = QATQuantizer("8da4w", recompute_weights=True, recompute_activations=True).prepare(_model())
    model(torch.randint(0, 128, (2, 16))).sum().backward()
    assert calls == {"forward": 9, "backward": 9}
    assert len(recomputed) == 2 * (3 + 1 + 2 + 1) + 1  # every quantized Linear's backward read one
    assert all(r.value is None and r.readers == 0 for r in recomputed)
    assert model.layers[0].attn.q_proj.activation_fake_quant._output is None
    assert copy.deepcopy(model).layers[0].attn.q_proj.activation_fake_quant.recompute


@pytest.mark.slow
def test_a_blocks_recomputed_weights_are_quantized_in_one_call_with_the_same_numbers(monkeypatch):
    """As on a GPU (turned on here for the CPU, with small weights taking the compiled path): one batched
    call per block in the forward and one in the backward, bit-identical to quantizing layer by layer,
    and nothing held afterwards. Slow only because the batched graph takes seconds to compile on a CPU."""
    from qattune.quant.modules import fused

    monkeypatch.setattr(fused, "FUSE_MIN_NUMEL", 1024)
    batched_calls = []
    original = recompute.fake_quantize_many_into
    monkeypatch.setattr(recompute, "fake_quantize_many_into",
                        lambda *args: batched_calls.append(len(args[1])) or original(*args))
    base, tokens = _model().to(torch.bfloat16), torch.randint(0, 128, (2, 16))
    runs = []
    for devices in ((), ("cpu",)):
        monkeypatch.setattr(recompute, "BATCHED_RECOMPUTE_DEVICES", devices)
        model = QATQuantizer("8da4w", recompute_weights=True, recompute_activations=True).prepare(copy.deepcopy(base))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        run = []
        for _ in range(2):  # the second step's weights changed: the batch must follow them
            _, loss, grads = _grads_after_one_step(model, tokens)
            run.append((loss, [g.clone() for g in grads]))
            optimizer.step()
            optimizer.zero_grad()
        runs.append(run)
    assert batched_calls == [7] * 8  # 2 blocks x (forward, backward) x 2 steps, all 7 weights of a block
    for (loss_l, grads_l), (loss_b, grads_b) in zip(*runs):
        assert torch.equal(loss_b, loss_l)
        assert all(torch.equal(g_b, g_l) for g_b, g_l in zip(grads_b, grads_l))
    groups = {id(m.recomputed_weights): m.recomputed_weights for m in model.modules() if isinstance(m, FakeQuantLinear)
              and m.recomputed_weights is not None}
    assert len(groups) == 2 and all(not ready for g in groups.values() for ready in g._ready)
    assert model.output.recomputed_weights is None  # outside the blocks: quantized on its own


@pytest.mark.slow
@pytest.mark.skipif(compiles_fake_quant_wrong(), reason="compile_blocks refuses fake quantization on this torch")
@pytest.mark.parametrize("recompute_activations", [False, True])
def test_recomputed_weights_under_torch_compile_train_like_eager(recompute_activations):
    """Slow only because torch.compile builds C++ kernels on the CPU."""
    from qattune.training import compile_blocks

    base, tokens = _model(), torch.randint(0, 128, (2, 16))
    losses = []
    for compiled in (False, True):
        model = QATQuantizer("8da4w", recompute_weights=True,
                             recompute_activations=recompute_activations).prepare(copy.deepcopy(base))
        if compiled:
            compile_blocks(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        run = []
        for _ in range(3):
            loss = model(tokens).float().logsumexp(-1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-6)  # same weights: same forward
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)  # then fused and eager rounding drift apart
    assert losses[0][2] < losses[0][0]


@pytest.mark.parametrize("world_size, option, recomputes", [
    (None, None, False),  # one process: one cached copy, the fastest
    (2, None, True),  # FSDP2: a cached copy would be each rank's whole model, not its shard
    (2, False, False),
    (None, True, True),
])
def test_weights_are_recomputed_by_default_only_when_training_is_sharded(monkeypatch, world_size, option, recomputes):
    if world_size is not None:
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world_size)
    model = QATQuantizer("8da4w", recompute_weights=option).prepare(_model())
    linears = [m for m in model.modules() if isinstance(m, FakeQuantLinear) and m.weight.requires_grad]
    assert len(linears) == 15 and {m.recompute_weight for m in linears} == {recomputes}
    assert all((m.recomputed_weights is not None) == (recomputes and m is not model.output) for m in linears)
