"""What every tokenizer promises, checked on each kind: round trips, special tokens from ids only,
chat ids = ids of the rendered chat, generation prompts as prefixes, masks, truncation, bad input."""

from __future__ import annotations

import pytest
from tok_assets import VARIED_TEXTS, write_tokenizer_gguf

from qattune.errors import QattuneError
from qattune.tokenizers import (Tokenizer, TiktokenTokenizer, gguf_tokenizer, llama2_tokenizer, llama3_tokenizer,
                                qwen2_5_tokenizer)

KINDS = ["llama3", "llama2", "qwen2_5", "gguf"]


@pytest.fixture(params=KINDS)
def tok(request, small_ranks, sp_model, qwen_dir, tmp_path_factory) -> Tokenizer:
    if request.param == "llama3":
        return llama3_tokenizer(str(small_ranks[0]))
    if request.param == "llama2":
        return llama2_tokenizer(str(sp_model))
    if request.param == "qwen2_5":
        return qwen2_5_tokenizer(str(qwen_dir / "tokenizer.json"))
    return gguf_tokenizer(str(write_tokenizer_gguf(tmp_path_factory.mktemp("gguf") / "t.gguf", qwen_dir)))


CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What does len() return?"},
    {"role": "assistant", "content": "The number of items in a container."},
    {"role": "user", "content": "And for a string? Ünïcode: 日本"},
    {"role": "assistant", "content": "Its number of code points, e.g. 2 for '日本'."},
]


def test_attributes(tok):
    assert isinstance(tok, Tokenizer)
    assert tok.bos_id is None or 0 <= tok.bos_id < tok.vocab_size
    for token_id in (tok.eos_id, tok.pad_id, *tok.stop_tokens):
        assert isinstance(token_id, int) and 0 <= token_id < tok.vocab_size
    assert tok.eos_id in tok.stop_tokens
    assert all(0 <= i < tok.vocab_size for i in tok.special_tokens.values())


def test_round_trip_and_bos_eos(tok):
    for text in VARIED_TEXTS:
        plain = tok.encode(text, add_bos=False, add_eos=False)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in plain)
        assert tok.decode(plain) == text
        full = tok.encode(text)
        assert full == ([tok.bos_id] if tok.bos_id is not None else []) + plain + [tok.eos_id]
        assert tok.decode(full) == text
        assert tok.encode(text, add_bos=False, add_eos=True) == plain + [tok.eos_id]


def test_special_token_text_is_not_parsed(tok):
    eos_text = next(t for t, i in tok.special_tokens.items() if i == tok.eos_id)
    ids = tok.encode(f"before {eos_text} after", add_bos=False, add_eos=False)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == f"before {eos_text} after"
    parsed = tok.encode(f"before {eos_text} after", add_bos=False, add_eos=False, allowed_special=[eos_text])
    assert parsed.count(tok.eos_id) == 1


def test_chat_ids_are_the_rendered_chat_and_masks_cover_answers(tok):
    ids, mask = tok.tokenize_messages(CONVERSATION)
    assert len(ids) == len(mask) and all(isinstance(m, bool) for m in mask)
    text = tok.render_chat(CONVERSATION)
    assert ids == tok.encode(text, add_bos=False, add_eos=False, allowed_special="all")
    answer_text = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
    assert answer_text.replace(" ", "") == "".join(m["content"] for m in CONVERSATION if m["role"] == "assistant").replace(" ", "")
    # each answer's span ends with an end-of-turn (stop) token, which is masked in
    ends = [i for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
    assert len(ends) == 2 and all(ids[i] in tok.stop_tokens for i in ends)
    # nothing the user or system wrote is masked in
    prompt_text = tok.decode([i for i, m in zip(ids, mask) if not m])
    for message in CONVERSATION[:2]:
        assert message["content"] in prompt_text


def test_generation_prompt_is_prefix(tok):
    prompt, prompt_mask = tok.tokenize_messages(CONVERSATION[:4], add_generation_prompt=True)
    full, full_mask = tok.tokenize_messages(CONVERSATION)
    assert full[: len(prompt)] == prompt and full_mask[: len(prompt)] == prompt_mask
    assert not full_mask[len(prompt) - 1] and full_mask[len(prompt)]


def test_truncation(tok):
    full, full_mask = tok.tokenize_messages(CONVERSATION)
    tok.max_seq_len = len(full) // 2
    try:
        ids, mask = tok.tokenize_messages(CONVERSATION)
    finally:
        tok.max_seq_len = None
    assert (ids, mask) == (full[: len(full) // 2], full_mask[: len(full) // 2])


@pytest.mark.parametrize("messages, error", [
    ("hello", "must be a list"),
    ([{"role": "user"}], "chat message 0 must be a dict with 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "chat message 1 has role 'tool'"),
    ([{"role": "user", "content": 5}], "chat message 0 \\(user\\) has content of type int"),
])
def test_bad_messages(tok, messages, error):
    with pytest.raises(QattuneError, match=error):
        tok.tokenize_messages(messages)


def test_tokenizer_without_chat_format():
    ranks = {bytes([b]): b for b in range(256)}
    tok = TiktokenTokenizer(name="bytes", pattern=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<eos>": 256}, bos_id=None, eos_id=256, pad_id=256)
    assert tok.encode("hé", add_bos=True, add_eos=True) == [104, 195, 169, 256]
    with pytest.raises(QattuneError, match="has no chat format"):
        tok.tokenize_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(QattuneError, match="is both a special token and an ordinary token"):
        TiktokenTokenizer(name="clash", pattern=r"\S+", mergeable_ranks=ranks, special_tokens={"<x>": 5},
                          bos_id=None, eos_id=5, pad_id=5)


def test_pickle_round_trip(tok):
    """Tokenizers cross process boundaries (DataLoader workers, torchrun spawn) by pickling."""
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    text = VARIED_TEXTS[1]
    assert clone.encode(text) == tok.encode(text)
    assert clone.tokenize_messages(CONVERSATION) == tok.tokenize_messages(CONVERSATION)
