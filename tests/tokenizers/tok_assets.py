"""Constants and helpers shared by the tokenizer tests (fixtures are in conftest.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

# Published pre-tokenizer regexes, written out here independently of qattune's copies.
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_5_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_5_ADDED_NOT_SPECIAL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                             "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

VARIED_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "héllo wörld — ünïcödé ß ﬁ 日本語のテキスト 한국어 Ελληνικά русский 🤖🎉👍🏽",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\nnew\n\n\nlines\r\nwindows\r\n   \n  indented",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10 ١٢٣",
    "it's they're I'M we'll you've he'd DON'T",
    "code: def f(x):\n    return x ** 2  # square\n\n\tif x != 0: pass",
    "a" * 300 + " " + "!" * 50 + "\u00a0\u2003\u3000" + " " * 40 + "end",
    "",
]


def pydoc_paragraphs(count: int, min_chars: int = 200) -> list[str]:
    """`count` paragraphs of real English text from the CPython docs shipped with Python."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            if len(paragraph) >= min_chars:
                out.append(paragraph)
                if len(out) == count:
                    return out
    return out




def write_ranks(path: Path, tokens: list[bytes]) -> Path:
    """A tiktoken ranks file: one `<base64 token> <rank>` line per token, ranks in list order."""
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def write_tokenizer_gguf(path: Path, qwen_dir: Path, *, model: str = "gpt2", pre: str = "qwen2",
                         with_tokenizer: bool = True, chat_template: str | None = None,
                         added: list[tuple[str, int]] | None = None, eos: str = "<|im_end|>",
                         pad: str | None = "<|endoftext|>", bos: str | None = None) -> Path:
    """A GGUF holding only tokenizer metadata: the vocabulary and merges of the tokenizer.json the qwen_dir
    fixture trained, then `added` (text, llama.cpp token type) or the file's own added tokens."""
    import gguf

    data = json.loads((qwen_dir / "tokenizer.json").read_text())
    tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    types = [1] * len(tokens)
    if added is None:
        added = [(t["content"], 3 if t["special"] else 4) for t in data["added_tokens"]]
    tokens += [text for text, _ in added]
    types += [kind for _, kind in added]
    writer = gguf.GGUFWriter(str(path), "qwen2")
    if with_tokenizer:
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]])
        writer.add_eos_token_id(tokens.index(eos))
        if pad is not None:
            writer.add_pad_token_id(tokens.index(pad))
        if bos is not None:
            writer.add_bos_token_id(tokens.index(bos))
        writer.add_add_bos_token(bos is not None)
        if chat_template:
            writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
