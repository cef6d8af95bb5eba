"""The Transformer on its own: KV-cache decoding, packed positions, meta-device builds, published sizes, RoPE."""

import math
import time

import pytest
import torch

import qattune.models as models
from qattune.errors import QattuneError
from qattune.models import llama
from qattune.models.adapters import half_split_to_interleaved, interleaved_to_half_split
from qattune.models.rope import RopeConfig, apply_rotary, inverse_frequencies, rotary_cos_sin

torch.set_num_threads(1)


def tiny(**overrides):
    kwargs = dict(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=96,
                  max_seq_len=64, rope_base=500.0)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = llama(**kwargs)
    with torch.no_grad():  # non-trivial norms and biases, so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("options", [{}, {"tie_embeddings": True, "qkv_bias": True}, {"rope_scaling_factor": 8.0,
                                     "rope_original_max_seq_len": 16}])  # fmt: skip
def test_kv_cache_decoding_matches_full_forward(options):
    model = tiny(**options)
    tokens = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=2, max_seq_len=32)
        assert model.caches_are_enabled()
        steps = [model(tokens[:, :7], input_pos=torch.arange(7))]
        for i in range(7, 20):
            steps.append(model(tokens[:, i : i + 1], input_pos=torch.tensor([i])))
        cached = torch.cat(steps, dim=1)
        assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()

        # reset_caches starts a new sequence in the same memory; a second prefill gives the same logits.
        model.reset_caches()
        assert model.layers[0].attn.kv_cache.k.abs().sum() == 0
        again = model(tokens[:, :7], input_pos=torch.arange(7))
        assert torch.allclose(again, full[:, :7], atol=1e-5)
    model.remove_caches()
    assert not model.caches_are_enabled()


def test_kv_cache_requires_positions():
    model = tiny()
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="input_pos is required"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_input_longer_than_max_seq_len_is_refused_in_one_line():
    model = tiny()  # max_seq_len=64
    assert model(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 64, 96)
    with pytest.raises(QattuneError, match=r"^a sequence of 65 tokens is longer than the model's max_seq_len=64: "
                                           r"lower the data's max_seq_len \(e.g. dataset.max_seq_len\)"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_packed_sequences_with_restarting_positions_equal_separate_forwards():
    model = tiny()
    doc_a, doc_b = torch.randint(0, 96, (1, 9)), torch.randint(0, 96, (1, 6))
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(6)]).unsqueeze(0)
    doc_id = torch.tensor([0] * 9 + [1] * 6)
    # block-causal: same document and not in the future
    mask = (doc_id[:, None] == doc_id[None, :]) & torch.ones(15, 15, dtype=torch.bool).tril()
    with torch.no_grad():
        together = model(packed, input_pos=positions, mask=mask.unsqueeze(0))
        separate = torch.cat([model(doc_a), model(doc_b)], dim=1)
    assert torch.allclose(together, separate, atol=1e-5)


def test_tied_head_is_one_parameter_and_survives_to_empty_and_assign_loading():
    model = tiny(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    with torch.device("meta"):
        fresh = llama(96, 2, 4, 2, 64, 96, 64, rope_base=500.0, tie_embeddings=True)
    fresh.to_empty(device="cpu")
    assert fresh.weights_tied()
    with torch.device("meta"):
        fresh = llama(96, 2, 4, 2, 64, 96, 64, rope_base=500.0, tie_embeddings=True)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "output.weight"}
    fresh.load_state_dict(state, assign=True)
    assert fresh.weights_tied()
    tokens = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(tokens), model(tokens))


def test_a_fresh_tied_model_starts_near_a_uniform_guess():
    """A tied head starts from the same small weights as init_weights (N(0, 0.02)), not nn.Embedding's
    N(0, 1): a from-scratch cross entropy near ln(vocab), not about ten times it."""
    torch.manual_seed(0)
    model = llama(260, 2, 4, 2, 64, 192, 256, tie_embeddings=True)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    tokens = torch.randint(0, 260, (4, 32))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(260)) < 0.1


def test_meta_built_model_can_be_initialised_from_scratch():
    with torch.device("meta"):
        model = llama(96, 2, 4, 2, 64, 96, 64, tie_embeddings=True, qkv_bias=True)
    model.to_empty(device="cpu")
    model.init_weights(std=0.02)
    assert model.weights_tied()
    assert torch.equal(model.norm.weight, torch.ones(64)) and torch.equal(model.layers[0].mlp_norm.weight, torch.ones(64))
    assert torch.equal(model.layers[1].attn.k_proj.bias, torch.zeros(32))
    assert abs(model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002
    with torch.no_grad():
        logits = model(torch.randint(0, 96, (2, 8)))
    assert torch.isfinite(logits).all() and 0.05 < logits.std() < 0.5  # ~ sqrt(64) * 0.02 from the tied head


def test_meta_build_of_8b_is_instant_and_allocates_nothing():
    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    with torch.device("meta"):
        models.llama3_2_1b()  # warm up torch's meta dispatch once
    before, start = rss_bytes(), time.perf_counter()
    with torch.device("meta"):
        model = models.llama3_8b()
    elapsed, grown = time.perf_counter() - start, rss_bytes() - before
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert elapsed < 2.0, elapsed
    assert grown < 64 * 2**20, grown  # 8B float32 would be 32 GB


# Parameter counts published with each model (Hugging Face model cards / safetensors metadata).
PUBLISHED = {
    "llama2_7b": 6_738_415_616,
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "smollm2_135m": 134_515_008,
    "smollm2_360m": 361_821_120,
    "smollm2_1_7b": 1_711_376_384,
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_3b": 3_085_938_688,
    "qwen2_5_7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builders_have_published_sizes(name):
    with torch.device("meta"):
        model = getattr(models, name)()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
    tied = name.startswith(("llama3_2", "smollm2")) or name in ("qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_3b")
    assert model.weights_tied() == tied
    assert (model.layers[0].attn.q_proj.bias is not None) == name.startswith("qwen")
    assert isinstance(model.layers, torch.nn.ModuleList)


def test_llama3_rope_scaling_follows_the_published_formula():
    cfg = RopeConfig(head_dim=128, base=500_000.0, scaling_factor=8.0)
    scaled = inverse_frequencies(cfg)
    plain = inverse_frequencies(RopeConfig(head_dim=128, base=500_000.0))
    for f, s in zip(plain.tolist(), scaled.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            expected = f
        elif wavelen > 8192 / 1:
            expected = f / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            expected = (1 - smooth) * f / 8 + smooth * f
        assert s == pytest.approx(expected, rel=1e-6)


def test_rotary_permutation_matches_metas_complex_rotation():
    """Meta rotates interleaved pairs as complex numbers; permuting our half-split result must equal that."""
    heads, head_dim, seq = 3, 16, 11
    cfg = RopeConfig(head_dim=head_dim, base=10_000.0)
    q = torch.randn(1, seq, heads, head_dim)
    cos, sin = rotary_cos_sin(cfg, torch.arange(seq))
    ours = apply_rotary(q, cos, sin)

    def to_meta(x):  # permute the features of every head as the adapter permutes q_proj rows
        flat = x.reshape(seq, heads * head_dim).T
        return half_split_to_interleaved(flat, heads).T.contiguous().reshape(1, seq, heads, head_dim)

    angles = torch.arange(seq).float()[:, None] * inverse_frequencies(cfg)[None, :]
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    q_meta = torch.view_as_complex(to_meta(q).reshape(1, seq, heads, -1, 2))
    meta = torch.view_as_real(q_meta * freqs_cis).flatten(3)
    assert torch.allclose(meta, to_meta(ours), atol=1e-6)
    w = torch.randn(heads * head_dim, 5)
    assert torch.equal(interleaved_to_half_split(half_split_to_interleaved(w, heads), heads), w)
