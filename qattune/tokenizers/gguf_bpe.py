"""Byte-level BPE tokenizer read from a GGUF file's metadata (SmolLM2, Llama 3, Qwen2 GGUFs), on tiktoken.

Reads tokenizer.ggml.{model, pre, tokens, token_type, merges, bos/eos/padding/eot_token_id,
add_bos_token} and tokenizer.chat_template. Ordinary tokens become tiktoken ranks (rank = id); control
tokens become special tokens; user-defined tokens are cut out of any text, like Hugging Face's added
tokens. The chat format follows the template: ChatML (with the template's default system prompt) when
the vocabulary has <|im_start|>, Llama 3's header format when it has <|start_header_id|>.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from qattune.errors import QattuneError

from .byte_level import GGUF_PRETOKENIZERS, byte_level_ranks, parse_merge
from .chat_format import ChatFormat, ChatMLFormat, Llama3ChatFormat, chatml_default_system_prompt, llama3_template_date
from .files import require_file
from .tiktoken_base import TiktokenTokenizer

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _field_value(field: Any) -> Any:
    """A GGUF metadata value as Python (str, int, float, bool or a list of them); works across gguf versions."""
    if field.types[0].name == "ARRAY":
        if field.types[-1].name == "STRING":
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if field.types[0].name == "STRING":
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


@lru_cache(maxsize=4)
def _tokenizer_metadata(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file, read once per file version (GGUFReader takes seconds)."""
    from qattune.gguf_reader import open_gguf

    try:
        fields = open_gguf(path).fields
    except Exception as err:  # gguf raises ValueError/struct.error/... on foreign files
        raise QattuneError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    return {key: _field_value(field) for key, field in fields.items() if key.startswith("tokenizer.")}


def read_tokenizer_metadata(path: str) -> dict[str, Any]:
    """`tokenizer.*` key -> value of the GGUF file at `path`."""
    file = require_file(path, "GGUF file")
    stat = file.stat()
    return _tokenizer_metadata(str(file.resolve()), stat.st_mtime_ns, stat.st_size)


def gguf_tokenizer(path: str, max_seq_len: Optional[int] = None,
                   default_system_prompt: Optional[str] = "auto") -> TiktokenTokenizer:
    """The byte-level BPE tokenizer stored in the GGUF file at `path` (e.g. SmolLM2-135M-Instruct).

    `default_system_prompt` (ChatML only): "auto" takes the one the file's chat template inserts when
    a conversation has no system message; None inserts none; any other text is used instead.
    """
    meta = read_tokenizer_metadata(path)

    def array(key: str) -> list:
        if key not in meta:
            raise QattuneError(f"{path} has no '{key}' metadata: it carries no byte-level BPE tokenizer qattune "
                               "can read; point the tokenizer at the model's own tokenizer files")
        return meta[key]

    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise QattuneError(f"{path} has no tokenizer metadata (tokenizer.ggml.model); use the model's own tokenizer files")
    if model != "gpt2":
        raise QattuneError(f"{path} has a '{model}' tokenizer; gguf_tokenizer reads byte-level BPE ('gpt2') only "
                           "(for a SentencePiece model use llama2_tokenizer with its tokenizer.model)")
    pre = meta.get("tokenizer.ggml.pre")
    if not pre:
        raise QattuneError(f"{path} names no pre-tokenizer (tokenizer.ggml.pre), so its text splitting is unknown; "
                           "convert the model again with a current llama.cpp")
    if pre not in GGUF_PRETOKENIZERS:
        raise QattuneError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                           f"supported: {', '.join(sorted(GGUF_PRETOKENIZERS))}")
    tokens = array("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise QattuneError(f"{path}: {len(tokens)} tokens but {len(types)} token types; the file is damaged")
    merges = [parse_merge(m, i, path) for i, m in enumerate(array("tokenizer.ggml.merges"))]

    ordinary = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == NORMAL}
    special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != NORMAL and t not in ordinary}
    added = [t for i, (t, kind) in enumerate(zip(tokens, types)) if kind == USER_DEFINED]
    ranks = byte_level_ranks(ordinary, merges, where=path)

    def token_id(key: str) -> Optional[int]:
        value = meta.get(key)
        if value is not None and not 0 <= value < len(tokens):
            raise QattuneError(f"{path}: {key} is {value}, outside the {len(tokens)} tokens")
        return value

    eos_id = token_id("tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise QattuneError(f"{path} names no end-of-sequence token (tokenizer.ggml.eos_token_id)")
    bos_id = token_id("tokenizer.ggml.bos_token_id")
    if not meta.get("tokenizer.ggml.add_bos_token", True):
        bos_id = None  # the model was trained without a leading bos (SmolLM2)
    pad_id = token_id("tokenizer.ggml.padding_token_id")
    stops = [i for i in (token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")) if i is not None]

    return TiktokenTokenizer(
        name=f"gguf:{Path(path).name}",
        pattern=GGUF_PRETOKENIZERS[pre],
        mergeable_ranks=ranks,
        special_tokens=special,
        added_tokens=added,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id,
        stop_tokens=stops,
        chat_format=_chat_format(special, None if bos_id is None else tokens[bos_id],
                                 meta.get("tokenizer.chat_template"), default_system_prompt),
        max_seq_len=max_seq_len,
    )


def _chat_format(special: dict[str, int], bos: Optional[str], template: Optional[str],
                 default_system_prompt: Optional[str]) -> Optional[ChatFormat]:
    """ChatML or Llama 3's format, recognised by their special tokens; None for other vocabularies."""
    if "<|im_start|>" in special and "<|im_end|>" in special:
        if default_system_prompt == "auto":
            default_system_prompt = chatml_default_system_prompt(template) if template else None
        return ChatMLFormat(default_system_prompt)
    if "<|start_header_id|>" in special and "<|eot_id|>" in special:
        return Llama3ChatFormat(bos=bos, date_string=llama3_template_date(template) if template else None)
    return None
