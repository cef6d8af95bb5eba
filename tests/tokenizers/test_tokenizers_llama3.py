"""Llama 3 tokenizer: ids against tiktoken's cl100k_base and an independent BPE, the published chat format."""

from __future__ import annotations

import pytest
import regex
from tok_assets import LLAMA3_REGEX, VARIED_TEXTS, pydoc_paragraphs, write_ranks

from qattune.errors import QattuneError
from qattune.tokenizers import LLAMA3_SPECIAL_TOKENS, llama3_tokenizer


def reference_bpe(text: str, ranks: dict[bytes, int]) -> list[int]:
    """Textbook BPE: split with the Llama 3 regex, then repeatedly merge the lowest-ranked adjacent pair."""
    ids = []
    for piece in regex.findall(LLAMA3_REGEX, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_small_ranks_file_matches_reference_bpe(small_ranks):
    path, tokens = small_ranks
    tok = llama3_tokenizer(str(path))
    ranks = {t: i for i, t in enumerate(tokens)}
    assert tok.vocab_size == len(tokens) + 256
    assert tok.bos_id == len(tokens) and tok.eos_id == len(tokens) + 1
    assert tok.special_id("<|eot_id|>") == len(tokens) + 9
    for text in VARIED_TEXTS + ["hello the world, hello thing\n\n    indented"]:
        ids = tok.encode(text, add_bos=False, add_eos=False)
        assert ids == reference_bpe(text, ranks), text
        assert tok.decode(ids) == text
    assert tok.encode("hello", add_bos=False, add_eos=False) == [ranks[b"hello"]]
    assert tok.encode(" the", add_bos=True, add_eos=True) == [tok.bos_id, ranks[b" the"], tok.eos_id]


def test_special_token_table():
    assert len(LLAMA3_SPECIAL_TOKENS) == len(set(LLAMA3_SPECIAL_TOKENS)) == 256
    offsets = {t: i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    assert offsets["<|begin_of_text|>"] == 0 and offsets["<|end_of_text|>"] == 1
    assert offsets["<|finetune_right_pad_id|>"] == 4
    assert (offsets["<|start_header_id|>"], offsets["<|end_header_id|>"]) == (6, 7)
    assert (offsets["<|eom_id|>"], offsets["<|eot_id|>"], offsets["<|python_tag|>"]) == (8, 9, 10)
    assert LLAMA3_SPECIAL_TOKENS[-1] == "<|reserved_special_token_247|>"


@pytest.fixture(scope="module")
def llama3(llama3_like_ranks):
    return llama3_tokenizer(str(llama3_like_ranks))


def test_ids_equal_cl100k_on_text(llama3, cl100k):
    texts = pydoc_paragraphs(40) + VARIED_TEXTS
    for text in texts:
        ids = llama3.encode(text, add_bos=False, add_eos=False)
        assert ids == cl100k.encode_ordinary(text)
        assert llama3.decode(ids) == text


def test_llama3_ids_of_special_tokens(llama3):
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, 128004)
    assert llama3.vocab_size == 128256
    assert sorted(llama3.stop_tokens) == [128001, 128008, 128009]
    # special-token text in user input is text, unless parsing is asked for
    plain = llama3.encode("a<|eot_id|>b", add_bos=False, add_eos=False)
    assert 128009 not in plain and llama3.decode(plain) == "a<|eot_id|>b"
    parsed = llama3.encode("a<|eot_id|>b", add_bos=False, add_eos=False, allowed_special="all")
    assert parsed[1] == 128009 and len(parsed) == 3
    only = llama3.encode("<|eot_id|><|eom_id|>", add_bos=False, add_eos=False, allowed_special={"<|eom_id|>"})
    assert only[-1] == 128008 and 128009 not in only
    with pytest.raises(QattuneError, match="not a special token"):
        llama3.encode("x", allowed_special={"<|nope|>"})
    ids = llama3.encode("Hi", add_bos=True, add_eos=True)
    assert ids[0] == 128000 and ids[-1] == 128001
    assert llama3.decode(ids) == "Hi"
    assert llama3.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>Hi<|end_of_text|>"
    assert llama3.decode([*ids, 10**6, -1]) == "Hi"  # ids with no token are skipped
    import torch

    assert llama3.decode(torch.tensor(ids)) == "Hi"


MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "  And of Italy?\n"},
    {"role": "assistant", "content": "Rome."},
]
# Llama 3's published chat format (Meta's model card / chat template), written out by hand.
PUBLISHED = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nRome.<|eot_id|>"
)


def test_chat_format_token_by_token(llama3, cl100k):
    assert llama3.render_chat(MESSAGES) == PUBLISHED
    bos, start, end, eot = 128000, 128006, 128007, 128009
    expected, mask = [bos], [False]
    for message in MESSAGES:
        header = [start, *cl100k.encode_ordinary(message["role"]), end, *cl100k.encode_ordinary("\n\n")]
        body = [*cl100k.encode_ordinary(message["content"].strip()), eot]
        expected += header + body
        mask += [False] * len(header) + [message["role"] == "assistant"] * len(body)
    ids, got_mask = llama3.tokenize_messages(MESSAGES)
    assert ids == expected
    assert got_mask == mask
    # the published text, tokenized whole with special tokens parsed, gives the same ids
    assert llama3.encode(PUBLISHED, add_bos=False, add_eos=False, allowed_special="all") == ids
    # the assistant's tokens decode to exactly its answers and end-of-turn tokens
    assert llama3.decode([i for i, m in zip(ids, got_mask) if m], skip_special_tokens=False) == \
        "The capital of France is Paris.<|eot_id|>Rome.<|eot_id|>"


def test_generation_prompt_is_a_prefix(llama3):
    prompt, prompt_mask = llama3.tokenize_messages(MESSAGES[:4], add_generation_prompt=True)
    full, full_mask = llama3.tokenize_messages(MESSAGES)
    assert full[: len(prompt)] == prompt and full_mask[: len(prompt)] == prompt_mask
    assert prompt[-4:] == [128006, *llama3.encode("assistant", False, False), 128007, 271] and not any(prompt_mask[-4:])
    assert llama3.render_chat(MESSAGES[:4], add_generation_prompt=True).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_truncation_keeps_the_first_tokens(llama3_like_ranks):
    full_tok = llama3_tokenizer(str(llama3_like_ranks))
    full, full_mask = full_tok.tokenize_messages(MESSAGES)
    short = llama3_tokenizer(str(llama3_like_ranks), max_seq_len=len(full) - 3)
    ids, mask = short.tokenize_messages(MESSAGES)
    assert ids == full[:-3] and mask == full_mask[:-3]
    assert ids[-1] != 128009  # no end-of-turn invented for the cut answer
    exact = llama3_tokenizer(str(llama3_like_ranks), max_seq_len=len(full))
    assert exact.tokenize_messages(MESSAGES) == (full, full_mask)
    # encode never truncates
    assert len(short.encode("word " * 500)) > short.max_seq_len


def test_long_whitespace_runs_do_not_crash(small_ranks):
    tok = llama3_tokenizer(str(small_ranks[0]))
    text = "start" + " " * 300_000 + "end\n" + "\t" * 60_000
    ids = tok.encode(text, add_bos=False, add_eos=False)
    assert tok.decode(ids) == text


def test_bad_files(tmp_path, small_ranks, sp_model):
    with pytest.raises(QattuneError, match="not found"):
        llama3_tokenizer(str(tmp_path / "missing.model"))
    lines = small_ranks[0].read_text().splitlines()
    lines[6] = "not-base64!! 6"
    bad = tmp_path / "bad.model"
    bad.write_text("\n".join(lines))
    with pytest.raises(QattuneError, match=r"bad.model:7: malformed ranks line"):
        llama3_tokenizer(str(bad))
    bad.write_text("QQ== 0\nQg==\n")
    with pytest.raises(QattuneError, match=r":2: malformed"):
        llama3_tokenizer(str(bad))
    write_ranks(bad, [b"A", b"A"])
    with pytest.raises(QattuneError, match=r":2: token b'A' or rank 1 appears twice"):
        llama3_tokenizer(str(bad))
    with pytest.raises(QattuneError, match="SentencePiece model"):
        llama3_tokenizer(str(sp_model))
    with pytest.raises(QattuneError, match="is a directory"):
        llama3_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}}}', encoding="utf-8")
    with pytest.raises(QattuneError, match=r"tokenizer.json lacks Llama 3's special token <\|begin_of_text\|>; is "
                                           r"this a Llama 3 tokenizer.json\?$"):
        llama3_tokenizer(str(tmp_path / "tokenizer.json"))


def test_hugging_face_tokenizer_json_equals_metas_ranks_file(small_ranks, tmp_path):
    """An HF Llama 3 folder without original/tokenizer.model: its tokenizer.json (written here by
    transformers' own tiktoken converter) gives the same tokenizer."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    from qattune.tokenizers.byte_level import LLAMA3_PATTERN

    ranks_file, _ = small_ranks
    converted = converter.TikTokenConverter(vocab_file=str(ranks_file), pattern=LLAMA3_PATTERN,
                                            extra_special_tokens=list(LLAMA3_SPECIAL_TOKENS)).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    meta, hf = llama3_tokenizer(str(ranks_file)), llama3_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.stop_tokens) == (meta.bos_id, meta.eos_id, meta.pad_id, meta.stop_tokens)
    assert hf.special_tokens == meta.special_tokens
    for text in VARIED_TEXTS + ["hello world, the end"]:
        assert hf.encode(text) == meta.encode(text) == [meta.bos_id, *converted.encode(text).ids, meta.eos_id]
    text = "<|eot_id|> in text"  # plain text unless asked (as torchtune); HF's tokenizers parses it always
    assert hf.encode(text) == meta.encode(text) != hf.encode(text, allowed_special="all")
    assert hf.encode(text, False, False, allowed_special="all") == converted.encode(text).ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "the world"}]
    assert hf.tokenize_messages(chat) == meta.tokenize_messages(chat)


# The Llama 3.1 / 3.2 Instruct Hugging Face template's layout (its tokenizer_config.json), written out by
# hand: a dated system message always comes first and holds the conversation's own system message.
DATED = "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


@pytest.mark.parametrize("messages, text", [
    (MESSAGES, "<|begin_of_text|>" + DATED + PUBLISHED.split("\n\n", 1)[1]),
    (MESSAGES[1:], "<|begin_of_text|>" + DATED + "<|eot_id|>" + PUBLISHED.split("<|eot_id|>", 1)[1]),
    ([{"role": "system", "content": " \n"}, *MESSAGES[1:2]],
     "<|begin_of_text|>" + DATED + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
     "What is the capital of France?<|eot_id|>"),
])
def test_date_string_gives_the_llama3_1_template_layout(llama3_like_ranks, messages, text):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from qattune.checkpoint.gguf_export import _chat_template

    tok = llama3_tokenizer(str(llama3_like_ranks), date_string="26 Jul 2024")
    assert tok.render_chat(messages) == text
    ids, mask = tok.tokenize_messages(messages)
    assert ids == tok.encode(text, add_bos=False, add_eos=False, allowed_special="all")
    answers = "".join(f"{m['content'].strip()}<|eot_id|>" for m in messages if m["role"] == "assistant")
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == answers
    prompt, _ = tok.tokenize_messages(messages[:-1] if messages[-1]["role"] == "assistant" else messages,
                                      add_generation_prompt=True)
    assert prompt[:len(prompt) - 4] == ids[:len(prompt) - 4]
    # the template a GGUF export writes renders the same text, as transformers and llama.cpp would
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(_chat_template(tok)).render(messages=messages, add_generation_prompt=False,
                                                           bos_token="<|begin_of_text|>")
    assert rendered == text


def test_template_date_is_read_from_a_llama3_1_or_3_2_template():
    from qattune.tokenizers.chat_format import llama3_template_date

    llama3_2 = ('{%- if not date_string is defined %}{%- if strftime_now is defined %}'
                '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
                '{%- endif %}{%- endif %}{{- "Cutting Knowledge Date: December 2023\\n" }}')
    assert llama3_template_date(llama3_2) == "26 Jul 2024"
    assert llama3_template_date(llama3_2.replace("26 Jul 2024", "01 Jan 2025")) == "01 Jan 2025"
    assert llama3_template_date("{{ bos_token }}{% for message in messages %}...{% endfor %}") is None
