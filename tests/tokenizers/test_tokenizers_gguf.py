"""Byte-level BPE from GGUF metadata: ids against a Hugging Face `tokenizers` BPE built from the same
vocabulary and merges (real SmolLM2 file, and a small GGUF written here), ChatML from the file's template."""

from __future__ import annotations

import pytest
from tok_assets import VARIED_TEXTS, pydoc_paragraphs, write_tokenizer_gguf

from qattune.errors import QattuneError
from qattune.tokenizers import LLAMA3_SPECIAL_TOKENS, gguf_tokenizer, qwen2_5_tokenizer

tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")


def hf_bpe(tokens: list[str], merges: list[str], pre_tokenizer) -> "tokenizers.Tokenizer":
    """Hugging Face's BPE over the ordinary tokens of a GGUF vocabulary (special ones left out)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def render_jinja(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """A chat template rendered the way transformers' apply_chat_template does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path) -> dict:
    reader = gguf.GGUFReader(smollm2_path)
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template")
    return {k: reader.fields[k].contents() for k in keys}


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_metadata):
    """SmolLM2's published tokenizer.json pipeline: Digits(individual) then ByteLevel, BPE from the GGUF."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return hf_bpe(smollm2_metadata["tokenizer.ggml.tokens"], smollm2_metadata["tokenizer.ggml.merges"], pre)


@pytest.mark.slow
def test_smollm2_ids_equal_reference_bpe(smollm2_tokenizer, smollm2_reference):
    texts = pydoc_paragraphs(60) + VARIED_TEXTS + ["x  5 and  42\n  7 tabs\t\t9", "   1. indented list\n      2. item"]
    for text in texts:
        ids = smollm2_tokenizer.encode(text, add_bos=False, add_eos=False)
        assert ids == smollm2_reference.encode(text).ids, text[:80]
        assert smollm2_tokenizer.decode(ids) == text


@pytest.mark.slow
def test_smollm2_bytes_without_a_token_are_dropped_like_hf(smollm2_tokenizer, smollm2_reference):
    # SmolLM2's vocabulary has no token for bytes 0x04 and 0xF1 (the first byte of U+40000)
    text = "end\x04of transmission !\x04! \U00040000 and more"
    ids = smollm2_tokenizer.encode(text, add_bos=False, add_eos=False)
    assert ids == smollm2_reference.encode(text).ids
    assert smollm2_tokenizer.decode(ids).startswith("endof transmission !! ")


@pytest.mark.slow
def test_smollm2_special_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152
    assert tok.bos_id is None  # tokenizer.ggml.add_bos_token is false
    assert (tok.eos_id, tok.pad_id) == (2, 2)
    assert (tok.special_id("<|endoftext|>"), tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>")) == (0, 1, 2)
    assert sorted(tok.stop_tokens) == [0, 2]
    assert tok.encode("hi", add_bos=True, add_eos=True)[-1] == 2
    assert 2 not in tok.encode("<|im_end|>", add_bos=False, add_eos=False)
    assert tok.encode("<|im_end|>", add_bos=False, add_eos=False, allowed_special="all") == [2]


CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Thanks! And 2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.mark.slow
def test_smollm2_chat_matches_the_files_template(smollm2_tokenizer, smollm2_metadata):
    tok, template = smollm2_tokenizer, smollm2_metadata["tokenizer.chat_template"]
    for messages in (CHAT, [{"role": "system", "content": "Be brief."}, *CHAT]):
        for add_generation_prompt in (False, True):
            text = tok.render_chat(messages, add_generation_prompt)
            assert text == render_jinja(template, messages, add_generation_prompt)
            ids, mask = tok.tokenize_messages(messages, add_generation_prompt)
            assert ids == tok.encode(text, add_bos=False, add_eos=False, allowed_special="all")
    ids, mask = tok.tokenize_messages(CHAT)
    assert tok.decode(ids[:3], skip_special_tokens=False) == "<|im_start|>system\n"
    # mask: exactly each answer's tokens and its <|im_end|>, checked token by token
    expected = []
    for piece, is_answer in [(p, False) for p in ("<|im_start|>", "system\nYou are a helpful AI assistant named SmolLM, "
                                                  "trained by Hugging Face", "<|im_end|>", "\n")] + [
            x for m in CHAT for x in [("<|im_start|>", False), (f"{m['role']}\n", False),
                                      (m["content"], m["role"] == "assistant"), ("<|im_end|>", m["role"] == "assistant"),
                                      ("\n", False)]]:
        n = len(tok.encode(piece, add_bos=False, add_eos=False, allowed_special="all"))
        expected += [is_answer] * n
    assert mask == expected
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == \
        "The capital of France is Paris.<|im_end|>4<|im_end|>"


@pytest.mark.slow
def test_smollm2_default_system_prompt_options(smollm2_path):
    none = gguf_tokenizer(smollm2_path, default_system_prompt=None)
    assert none.render_chat(CHAT[:1]) == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    custom = gguf_tokenizer(smollm2_path, default_system_prompt="Answer in French.")
    assert custom.render_chat(CHAT[:1]).startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n")


# ---------------------------------------------------------------- a small GGUF written here


QWEN_LIKE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a test model.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_small_gguf_matches_hf_and_the_tokenizer_json(tmp_path, qwen_dir):
    from tokenizers import Tokenizer

    path = write_tokenizer_gguf(tmp_path / "tok.gguf", qwen_dir, chat_template=QWEN_LIKE_TEMPLATE)
    tok = gguf_tokenizer(str(path))
    hf = Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    qwen = qwen2_5_tokenizer(str(qwen_dir / "tokenizer.json"))
    texts = pydoc_paragraphs(15) + VARIED_TEXTS + ["call <tool_call>{\"x\": 1}</tool_call> done"]
    for text in texts:
        ids = tok.encode(text, add_bos=False, add_eos=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids == qwen.encode(text, add_bos=False, add_eos=False)
        assert tok.decode(ids) == text
    # user-defined (non-special) tokens are always cut out and kept by decode; control tokens are not parsed
    tool = tok.encode("<tool_call>", add_bos=False, add_eos=False)
    assert tool == [tok.special_tokens["<tool_call>"]] and tok.decode(tool) == "<tool_call>"
    assert tok.bos_id is None and tok.eos_id == tok.special_id("<|im_end|>") and tok.pad_id == tok.special_id("<|endoftext|>")
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the answer"}]
    assert tok.render_chat(messages, True) == render_jinja(QWEN_LIKE_TEMPLATE, messages, True)
    assert tok.render_chat(messages).startswith("<|im_start|>system\nYou are a test model.<|im_end|>\n")


def test_small_gguf_with_llama3_special_tokens_uses_the_llama3_format(tmp_path, qwen_dir):
    path = write_tokenizer_gguf(tmp_path / "l3.gguf", qwen_dir, pre="llama-bpe", added=[(t, 3) for t in LLAMA3_SPECIAL_TOKENS],
                                bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None)
    tok = gguf_tokenizer(str(path))
    first = tok.special_id("<|begin_of_text|>")
    assert tok.bos_id == first and tok.eos_id == first + 9 and tok.pad_id == tok.eos_id
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    text = tok.render_chat(messages)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    ids, mask = tok.tokenize_messages(messages)
    assert ids == tok.encode(text, add_bos=False, add_eos=False, allowed_special="all") and ids[0] == first
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "Hello!<|eot_id|>"


def test_a_llama3_1_gguf_template_gives_its_dated_system_message(tmp_path, qwen_dir):
    template = ('{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
                '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}{{- "Cutting Knowledge Date: December 2023\\n" }}'
                '{{- "Today Date: " + date_string + "\\n\\n" }}')
    path = write_tokenizer_gguf(tmp_path / "l31.gguf", qwen_dir, pre="llama-bpe", chat_template=template,
                                added=[(t, 3) for t in LLAMA3_SPECIAL_TOKENS], bos="<|begin_of_text|>", eos="<|eot_id|>",
                                pad=None)
    text = gguf_tokenizer(str(path)).render_chat([{"role": "user", "content": "Hi"}])
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                    "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")


def test_gguf_errors(tmp_path, qwen_dir):
    with pytest.raises(QattuneError, match="GGUF file not found"):
        gguf_tokenizer(str(tmp_path / "none.gguf"))
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello, I am not a GGUF file at all" * 10)
    with pytest.raises(QattuneError, match="is not a readable GGUF file"):
        gguf_tokenizer(str(not_gguf))
    bare = write_tokenizer_gguf(tmp_path / "bare.gguf", qwen_dir, with_tokenizer=False)
    with pytest.raises(QattuneError, match=r"has no tokenizer metadata \(tokenizer.ggml.model\)"):
        gguf_tokenizer(str(bare))
    spm = write_tokenizer_gguf(tmp_path / "spm.gguf", qwen_dir, model="llama")
    with pytest.raises(QattuneError, match="'llama' tokenizer; gguf_tokenizer reads byte-level BPE"):
        gguf_tokenizer(str(spm))
    missing_pre = tmp_path / "nopre.gguf"
    with pytest.raises(QattuneError, match=r"names no pre-tokenizer \(tokenizer.ggml.pre\)"):
        gguf_tokenizer(str(write_tokenizer_gguf(missing_pre, qwen_dir, pre="")))
    odd = write_tokenizer_gguf(tmp_path / "odd.gguf", qwen_dir, pre="mystery")
    with pytest.raises(QattuneError, match="pre-tokenizer 'mystery'"):
        gguf_tokenizer(str(odd))
    # without a chat template, <|im_start|>/<|im_end|> in the vocabulary still mean ChatML (no system prompt)
    plain = gguf_tokenizer(str(write_tokenizer_gguf(tmp_path / "plain.gguf", qwen_dir)))
    assert plain.render_chat([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n"
