"""Tokenizer files written for Hugging Face from a GGUF load in `tokenizers`/`transformers` and give the
same ids and chat text as qattune's GGUF tokenizer."""

from __future__ import annotations

import pytest
from tok_assets import VARIED_TEXTS, pydoc_paragraphs, write_tokenizer_gguf

from qattune.errors import QattuneError
from qattune.tokenizers import LLAMA3_SPECIAL_TOKENS, gguf_tokenizer, write_hf_tokenizer_files

tokenizers = pytest.importorskip("tokenizers")

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
            "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]


def assert_same_ids(hf_tokenizer, tok, texts):
    for text in texts:
        expected = tok.encode(text, add_bos=True, add_eos=False)
        assert hf_tokenizer.encode(text).ids == expected, text[:80]
        assert hf_tokenizer.decode(expected, skip_special_tokens=True) == text


@pytest.mark.parametrize("variant", ["chatml", "llama3"])
def test_small_gguf_export_loads_in_hf_tokenizers(tmp_path, qwen_dir, variant):
    if variant == "chatml":
        gguf_path = write_tokenizer_gguf(tmp_path / "t.gguf", qwen_dir, chat_template=TEMPLATE)
    else:
        gguf_path = write_tokenizer_gguf(tmp_path / "t.gguf", qwen_dir, pre="llama-bpe", bos="<|begin_of_text|>",
                                         eos="<|eot_id|>", pad=None, added=[(t, 3) for t in LLAMA3_SPECIAL_TOKENS])
    files = write_hf_tokenizer_files(str(gguf_path), str(tmp_path / "hf"))
    assert sorted(p.rsplit("/", 1)[1] for p in files) == ["tokenizer.json", "tokenizer_config.json"]
    tok = gguf_tokenizer(str(gguf_path))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert_same_ids(hf, tok, pydoc_paragraphs(10) + VARIED_TEXTS)
    assert (tok.bos_id is not None) == (variant == "llama3")  # so the bos check above ran for Llama 3


def test_export_with_transformers_chat_template(tmp_path, qwen_dir):
    transformers = pytest.importorskip("transformers")
    gguf_path = write_tokenizer_gguf(tmp_path / "t.gguf", qwen_dir, chat_template=TEMPLATE)
    write_hf_tokenizer_files(str(gguf_path), str(tmp_path / "hf"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    tok = gguf_tokenizer(str(gguf_path))
    assert (hf.eos_token, hf.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for add_generation_prompt in (False, True):
        assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt) == \
            tok.render_chat(MESSAGES, add_generation_prompt)
    text = tok.render_chat(MESSAGES)
    assert hf(text, add_special_tokens=False).input_ids == tok.tokenize_messages(MESSAGES)[0]


def test_export_refuses_a_gguf_without_tokenizer(tmp_path, qwen_dir):
    bare = write_tokenizer_gguf(tmp_path / "bare.gguf", qwen_dir, with_tokenizer=False)
    with pytest.raises(QattuneError, match="has no tokenizer metadata"):
        write_hf_tokenizer_files(str(bare), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_export_matches_in_transformers(tmp_path, smollm2_path, smollm2_tokenizer):
    transformers = pytest.importorskip("transformers")
    write_hf_tokenizer_files(smollm2_path, str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in pydoc_paragraphs(20) + VARIED_TEXTS + ["x  5 and  42\n  7"]:
        assert hf(text, add_special_tokens=True).input_ids == smollm2_tokenizer.encode(text, add_bos=True, add_eos=False)
    assert hf.apply_chat_template(MESSAGES, tokenize=False) == smollm2_tokenizer.render_chat(MESSAGES)
