"""Llama 2: SentencePiece round trips and Meta's [INST] chat layout, against sentencepiece itself."""

from __future__ import annotations

import pytest
import sentencepiece
from tok_assets import VARIED_TEXTS, pydoc_paragraphs

from qattune.errors import QattuneError
from qattune.tokenizers import llama2_tokenizer


@pytest.fixture(scope="module")
def sp(sp_model):
    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture(scope="module")
def llama2(sp_model):
    return llama2_tokenizer(str(sp_model))


def test_round_trips_and_ids(llama2, sp):
    assert (llama2.bos_id, llama2.eos_id, llama2.pad_id, llama2.stop_tokens) == (1, 2, 0, [2])
    assert llama2.vocab_size == sp.vocab_size() == 800
    for text in VARIED_TEXTS + pydoc_paragraphs(10):
        ids = llama2.encode(text, add_bos=True, add_eos=True)
        assert ids == [1, *sp.encode(text), 2]
        assert llama2.decode(ids) == text
    assert llama2.decode([1, *sp.encode("hi there"), 2], skip_special_tokens=False) == "<s>hi there</s>"
    assert llama2.decode([*sp.encode("ok"), 5000, -3]) == "ok"  # ids outside the vocabulary are skipped
    # "<s>" in text is text; parsed only when asked
    assert 1 not in llama2.encode("a <s> b", add_bos=False, add_eos=False)
    assert llama2.encode("<s>a</s>", add_bos=False, add_eos=False, allowed_special="all") == [1, *sp.encode("a"), 2]


SYSTEM = {"role": "system", "content": "You are terse."}
MESSAGES = [
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "An ordered, mutable sequence."},
    {"role": "user", "content": "And a tuple? "},
    {"role": "assistant", "content": " An immutable one."},
]


def meta_llama2_reference(sp, system: str, turns: list[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """Meta's llama/generation.py chat encoding: per (user, answer) pair,
    bos + encode(f"[INST] {user} [/INST] {answer} ") + eos; the first user message carries the system block,
    and the user text is stripped only after the system block is folded in."""
    ids, mask = [], []
    for index, (user, answer) in enumerate(turns):
        if index == 0:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        user = user.strip()
        prompt = sp.encode(f"[INST] {user} [/INST]")
        whole = sp.encode(f"[INST] {user} [/INST] {answer.strip()} ")
        assert whole[: len(prompt)] == prompt  # the answer starts on a token boundary
        ids += [1, *whole, 2]
        mask += [False] * (1 + len(prompt)) + [True] * (len(whole) - len(prompt) + 1)
    return ids, mask


def test_chat_layout_matches_meta(llama2, sp):
    messages = [SYSTEM, *MESSAGES]
    ids, mask = llama2.tokenize_messages(messages)
    expected_ids, expected_mask = meta_llama2_reference(sp, SYSTEM["content"], [
        (MESSAGES[0]["content"], MESSAGES[1]["content"]), (MESSAGES[2]["content"], MESSAGES[3]["content"])])
    assert ids == expected_ids
    assert mask == expected_mask
    assert llama2.render_chat(messages) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is a list? [/INST] An ordered, mutable sequence. </s>"
        "<s>[INST] And a tuple? [/INST] An immutable one. </s>")
    assert llama2.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == \
        "An ordered, mutable sequence. </s>An immutable one. </s>"
    # a prompt ending with a user turn is a prefix of the answered conversation
    prompt, prompt_mask = llama2.tokenize_messages(messages[:4], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and not any(prompt_mask[-3:])
    assert llama2.render_chat(messages[:4], add_generation_prompt=True).endswith("[INST] And a tuple? [/INST]")


def test_system_and_user_whitespace_is_kept_inside_the_system_block(llama2, sp):
    """Only the folded first message is stripped, as in Meta's code and HF's template."""
    messages = [{"role": "system", "content": " Be nice.\n"}, {"role": "user", "content": "  Hi"},
                {"role": "assistant", "content": "Hello."}]
    assert llama2.render_chat(messages) == "<s>[INST] <<SYS>>\n Be nice.\n\n<</SYS>>\n\n  Hi [/INST] Hello. </s>"
    assert llama2.tokenize_messages(messages)[0] == meta_llama2_reference(sp, " Be nice.\n", [("  Hi", "Hello.")])[0]


def test_chat_errors(llama2):
    with pytest.raises(QattuneError, match="a system message may only be the first message"):
        llama2.tokenize_messages([*MESSAGES[:2], SYSTEM, MESSAGES[2]])
    with pytest.raises(QattuneError, match="must start with a user message"):
        llama2.tokenize_messages([MESSAGES[1]])
    with pytest.raises(QattuneError, match="must be followed by a user message"):
        llama2.tokenize_messages([SYSTEM])


def test_bad_files(tmp_path, small_ranks):
    with pytest.raises(QattuneError, match="SentencePiece model not found"):
        llama2_tokenizer(str(tmp_path / "tokenizer.model"))
    with pytest.raises(QattuneError, match="is not a SentencePiece model"):
        llama2_tokenizer(str(small_ranks[0]))
