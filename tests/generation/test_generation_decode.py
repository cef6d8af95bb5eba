"""KV-cache decoding: equal to a no-cache greedy loop, batching invariance, stop tokens, quantized models."""

import copy

import pytest
import torch

from gen_tiny import ByteChatTokenizer, tiny_model
from qattune.errors import QattuneError
from qattune.generation import generate, generate_text
from qattune.quant import PTQQuantizer, QATQuantizer

PROMPTS = [[1, 40, 41, 42], [1, 77], [1, 9, 8, 7, 6, 5, 4, 3, 2, 100, 101, 102], [1, 200, 201, 202, 203, 204, 205]]


def greedy_without_cache(model, prompt, steps):
    """Reference: run the whole sequence through the model for every new token (no cache, no padding)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))
            ids.append(int(torch.argmax(logits[0, -1])))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def test_cached_greedy_equals_the_no_cache_loop(model):
    for prompt in PROMPTS[:2]:
        out = generate(model, [prompt], 12)
        assert out.tokens == [greedy_without_cache(model, prompt, 12)]
        assert out.finish_reasons == ["length"]
    assert not model.caches_are_enabled()  # caches are removed after the call


def test_batched_prompts_of_different_lengths_match_one_at_a_time(model):
    batched = generate(model, PROMPTS, 10)
    alone = [generate(model, [p], 10).tokens[0] for p in PROMPTS]
    assert batched.tokens == alone
    assert len({len(p) for p in PROMPTS}) == len(PROMPTS)  # really different lengths
    assert len({tuple(t) for t in alone}) > 1  # and different outputs, so rows cannot be mixed up unnoticed


def test_batched_logits_match_unbatched_positions(model):
    """The first generated token's logits of a padded row equal the logits of the prompt alone."""
    captured = []
    handle = model.output.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    try:
        generate(model, PROMPTS[:2], 1)
    finally:
        handle.remove()
    with torch.no_grad():
        alone = model(torch.tensor([PROMPTS[1]]))[0, -1]
    torch.testing.assert_close(captured[0][1, len(PROMPTS[1]) - 1], alone, rtol=1e-5, atol=1e-5)


def test_stop_token_ends_only_its_row(model):
    free = generate(model, PROMPTS[:2], 10).tokens
    stop = free[0][4]
    first_hit = [row.index(stop) if stop in row else None for row in free]
    out = generate(model, PROMPTS[:2], 10, stop_tokens=[stop])
    for row, hit, got, reason in zip(free, first_hit, out.tokens, out.finish_reasons):
        if hit is None:
            assert got == row and reason == "length"
        else:
            assert got == row[:hit] and reason == "stop_token"
    assert out.stats.generated_tokens == sum(len(r) + (h is not None) for r, h in zip(out.tokens, first_hit))


def test_stop_condition_and_zero_new_tokens(model):
    out = generate(model, PROMPTS[:2], 10, stop_condition=lambda row, ids: row == 1 and len(ids) == 3)
    assert len(out.tokens[1]) == 3 and out.finish_reasons[1] == "stop_condition"
    assert len(out.tokens[0]) == 10
    assert generate(model, PROMPTS[:1], 0).tokens == [[]]


def test_sampling_is_reproducible_with_a_seed_and_stats_add_up(model):
    a = generate(model, PROMPTS, 8, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    b = generate(model, PROMPTS, 8, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    assert a.tokens == b.tokens
    stats = a.stats
    assert stats.batch_size == 4 and stats.prompt_tokens == sum(map(len, PROMPTS))
    assert stats.generated_tokens == 32
    assert stats.decode_tokens_per_s == pytest.approx((32 - 4) / stats.decode_time_s)
    assert stats.to_dict()["tokens_per_s"] == pytest.approx(32 / (stats.time_to_first_token_s + stats.decode_time_s))


@pytest.mark.parametrize("scheme, options", [("8da4w", {}), ("4w", {"group_size": 32}), ("q4_0", {})])
def test_quantized_models_decode_like_their_no_cache_loop(model, scheme, options):
    """q4_0 also quantizes the token embedding (the cache dtype then comes from the converted model)."""
    quantized = PTQQuantizer(scheme, **options).convert(copy.deepcopy(model))
    out = generate(quantized, PROMPTS, 6)
    assert out.tokens == [greedy_without_cache(quantized, p, 6) for p in PROMPTS]


def test_fake_quantized_model_decodes_and_still_trains_afterwards(model):
    """A QAT-prepared model (sample generation during training) decodes exactly and can train on afterwards."""
    prepared = QATQuantizer("8da4w").prepare(copy.deepcopy(model))
    out = generate(prepared, PROMPTS[:2], 4)
    assert out.tokens == [greedy_without_cache(prepared, p, 4) for p in PROMPTS[:2]]
    prepared.train()
    logits = prepared(torch.tensor([PROMPTS[0]]))
    logits.float().logsumexp(-1).mean().backward()
    assert prepared.layers[0].attn.q_proj.weight.grad is not None


def test_chat_prompt_goes_through_the_chat_format(model):
    tokenizer = ByteChatTokenizer()
    messages = [{"role": "user", "content": "hi"}]
    result = generate_text(model, tokenizer, [messages, "plain"], 5)
    chat_ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_bos=False,
                                add_eos=False, allowed_special="all")
    expected = generate(model, [chat_ids, tokenizer.encode("plain", add_eos=False)], 5,
                        stop_tokens=tokenizer.stop_tokens, pad_id=0)
    assert result.output.tokens == expected.tokens
    assert result.texts == [tokenizer.decode(t) for t in expected.tokens]


def test_too_long_request_is_a_clear_error():
    small = tiny_model(max_seq_len=16)
    with pytest.raises(QattuneError, match=r"longest prompt \(12 tokens\) plus max_new_tokens=5 is 17, beyond "
                                           r"the model's max_seq_len 16"):
        generate(small, [PROMPTS[2]], 5)
    with pytest.raises(QattuneError, match="prompt 1 is empty"):
        generate(small, [[1], []], 2)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens(model):
    """Slow only because torch.compile builds C++ kernels on the CPU (tens of seconds)."""
    eager = generate(model, PROMPTS[:2], 6)
    compiled = generate(model, PROMPTS[:2], 6, compile=True)
    assert compiled.tokens == eager.tokens
    assert not model.caches_are_enabled()


def test_cuda_graph_needs_a_cuda_model(model):
    with pytest.raises(QattuneError, match="cuda_graph=True needs a model on a CUDA device; this one is on cpu"):
        generate(model, PROMPTS[:1], 3, cuda_graph=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("scheme", [None, "4w"])
def test_cuda_graph_decoding_gives_the_eager_tokens(model, scheme):
    """Replays run the recorded kernels, so tokens equal eager ones exactly (float, and 4w's tinygemm in
    bf16); rows of different lengths check the per-row positions inside the graph."""
    gpu = copy.deepcopy(model).cuda()
    if scheme is not None:
        gpu = PTQQuantizer(scheme, group_size=32).convert(gpu.to(torch.bfloat16))
    eager = generate(gpu, PROMPTS, 16)
    graphed = generate(gpu, PROMPTS, 16, cuda_graph=True)
    assert graphed.tokens == eager.tokens
    assert len({tuple(t) for t in eager.tokens}) > 1
    assert not gpu.caches_are_enabled()


@needs_cuda
@pytest.mark.slow
def test_cuda_graph_over_a_compiled_step_gives_the_compiled_tokens(model):
    gpu = copy.deepcopy(model).cuda()
    compiled = generate(gpu, PROMPTS[:2], 12, compile=True)
    both = generate(gpu, PROMPTS[:2], 12, compile=True, cuda_graph=True)
    assert both.tokens == compiled.tokens
