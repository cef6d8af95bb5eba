"""Qwen2.5: ids against Hugging Face `tokenizers` on a tokenizer.json trained here, vocab.json + merges.txt,
added tokens, and ChatML with Qwen's default system prompt."""

from __future__ import annotations

import json

import pytest
from tok_assets import QWEN2_5_ADDED, QWEN2_5_ADDED_NOT_SPECIAL, VARIED_TEXTS, pydoc_paragraphs

from qattune.errors import QattuneError
from qattune.tokenizers import QWEN2_5_DEFAULT_SYSTEM_PROMPT, qwen2_5_tokenizer

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def hf(qwen_dir):
    return tokenizers.Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return qwen2_5_tokenizer(str(qwen_dir / "tokenizer.json"))


TEXTS_WITH_ADDED = [
    "Call it: <tool_call>{\"name\": \"f\"}</tool_call> then <|fim_prefix|>def<|fim_suffix|>",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


def test_ids_equal_hf(qwen, hf):
    for text in pydoc_paragraphs(40) + VARIED_TEXTS:
        ids = qwen.encode(text, add_bos=False, add_eos=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text[:80]
        assert qwen.decode(ids) == text == hf.decode(ids)
    for text in TEXTS_WITH_ADDED:  # HF cuts every added token out of text; qattune does when asked
        assert qwen.encode(text, False, False, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids
        assert qwen.decode(qwen.encode(text, False, False, allowed_special="all"), skip_special_tokens=False) == text


def test_text_is_nfc_normalized_as_in_hf(qwen, hf, qwen_dir):
    """Decomposed accents and compatibility characters encode as their NFC form, from either file layout."""
    from_merges = qwen2_5_tokenizer(str(qwen_dir / "split" / "vocab.json"), str(qwen_dir / "split" / "merges.txt"))
    for text in ["cafe\u0301 re\u0301sume\u0301", "\u212b vs A\u030a", "nai\u0308ve <tool_call>e\u0301"]:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert qwen.encode(text, False, False, allowed_special="all") == expected, text
        assert from_merges.encode(text, False, False, allowed_special="all") == expected, text
    assert qwen.encode("cafe\u0301", False, False) == qwen.encode("caf\u00e9", False, False)


def test_special_and_added_tokens(qwen, hf):
    vocab_size = hf.get_vocab_size(with_added_tokens=False)
    assert [qwen.special_id(t) for t in QWEN2_5_ADDED + QWEN2_5_ADDED_NOT_SPECIAL] == \
        list(range(vocab_size, vocab_size + 22))
    assert qwen.vocab_size == vocab_size + 22
    endoftext, im_start, im_end = (vocab_size + i for i in range(3))
    assert qwen.bos_id is None and qwen.eos_id == endoftext and qwen.pad_id == endoftext
    assert sorted(qwen.stop_tokens) == [endoftext, im_end]
    assert qwen.encode("hi", add_bos=True, add_eos=True)[-1] == endoftext
    # special tokens in text are text; non-special added tokens are always cut out (as in HF)
    ids = qwen.encode("<|im_end|><tool_call>", add_bos=False, add_eos=False)
    assert im_end not in ids and ids[-1] == qwen.special_id("<tool_call>")
    # decoding skips special tokens but keeps added ones (HF's skip_special_tokens does the same)
    mixed = [im_start, *qwen.encode("a<tool_call>b", False, False), im_end]
    assert qwen.decode(mixed) == hf.decode(mixed, skip_special_tokens=True) == "a<tool_call>b"
    assert qwen.decode(mixed, skip_special_tokens=False) == "<|im_start|>a<tool_call>b<|im_end|>"


def test_vocab_and_merges_files_and_directory(qwen_dir, qwen):
    split = qwen2_5_tokenizer(str(qwen_dir / "split" / "vocab.json"), merges_file=str(qwen_dir / "split" / "merges.txt"))
    from_dir = qwen2_5_tokenizer(str(qwen_dir))
    text = "\n\n".join(pydoc_paragraphs(10)) + "<tool_call>"
    expected = qwen.encode(text, add_bos=False, add_eos=False)
    assert split.encode(text, add_bos=False, add_eos=False) == expected
    assert from_dir.encode(text, add_bos=False, add_eos=False) == expected
    assert split.special_tokens == qwen.special_tokens


def test_eos_from_tokenizer_config(tmp_path, qwen_dir):
    (tmp_path / "tokenizer.json").write_text((qwen_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    instruct = qwen2_5_tokenizer(str(tmp_path / "tokenizer.json"))
    assert instruct.eos_id == instruct.special_id("<|im_end|>")


MESSAGES = [
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven is prime."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Eleven."},
]


def test_chatml_with_qwen_default_system_prompt(qwen):
    expected_text = (
        f"<|im_start|>system\n{QWEN2_5_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\nSeven is prime.<|im_end|>\n"
        "<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\nEleven.<|im_end|>\n")
    assert qwen.render_chat(MESSAGES) == expected_text
    ids, mask = qwen.tokenize_messages(MESSAGES)
    assert ids == qwen.encode(expected_text, add_bos=False, add_eos=False, allowed_special="all")
    enc = lambda s: qwen.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    start, end = qwen.special_id("<|im_start|>"), qwen.special_id("<|im_end|>")
    expected_mask = [False] * (1 + len(enc(f"system\n{QWEN2_5_DEFAULT_SYSTEM_PROMPT}")) + 1 + len(enc("\n")))
    for message in MESSAGES:
        answer = message["role"] == "assistant"
        expected_mask += [False] * (1 + len(enc(f"{message['role']}\n"))) + [answer] * (len(enc(message["content"])) + 1)
        expected_mask += [False] * len(enc("\n"))
    assert mask == expected_mask
    assert ids.count(start) == 5 and ids.count(end) == 5
    # a system message replaces the default one; None turns the default off
    with_system = qwen.render_chat([{"role": "system", "content": "Be terse."}, *MESSAGES[:1]], add_generation_prompt=True)
    assert with_system == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n"


def test_no_default_system_prompt_and_truncation(qwen_dir):
    tok = qwen2_5_tokenizer(str(qwen_dir / "tokenizer.json"), default_system_prompt=None, max_seq_len=12)
    assert tok.render_chat(MESSAGES[:1]) == "<|im_start|>user\nName a prime.<|im_end|>\n"
    full = qwen2_5_tokenizer(str(qwen_dir / "tokenizer.json"), default_system_prompt=None)
    ids, mask = tok.tokenize_messages(MESSAGES)
    full_ids, full_mask = full.tokenize_messages(MESSAGES)
    assert len(full_ids) > 12 and (ids, mask) == (full_ids[:12], full_mask[:12])


def test_bad_files(tmp_path, qwen_dir):
    with pytest.raises(QattuneError, match="Qwen tokenizer file not found"):
        qwen2_5_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(QattuneError, match="is not valid JSON"):
        qwen2_5_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(QattuneError, match="no byte-level BPE model"):
        qwen2_5_tokenizer(str(tmp_path / "tokenizer.json"))
    data = json.loads((qwen_dir / "tokenizer.json").read_text())
    data["model"]["merges"] = data["model"]["merges"][:5] + [["Ġzz", "qq"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(QattuneError, match=r"merge 5 \('Ġzz' \+ 'qq'\) uses or makes a token that is not in the vocabulary"):
        qwen2_5_tokenizer(str(tmp_path / "tokenizer.json"))
    data = json.loads((qwen_dir / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_end|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(QattuneError, match=r"lacks Qwen's special token <\|im_end\|>"):
        qwen2_5_tokenizer(str(tmp_path / "tokenizer.json"))
    data = json.loads((qwen_dir / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(QattuneError, match=r"normalizer \['NFC', 'Lowercase'\] is not supported; qwen2_5_tokenizer reads one of"):
        qwen2_5_tokenizer(str(tmp_path / "tokenizer.json"))
