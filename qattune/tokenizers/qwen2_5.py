"""Qwen2.5 tokenizer: byte-level BPE from `tokenizer.json` (or vocab.json + merges.txt) on tiktoken.

Pre-tokenization uses the regex in the file's pre-tokenizer when it has one (Qwen's own), else Qwen2's.
Special tokens come from the file's `added_tokens` (tokenizer.json) or `added_tokens_decoder` in a
tokenizer_config.json beside vocab.json; without either, Qwen2.5's 22 standard ones follow the
vocabulary (<|endoftext|> = len(vocab), as in the released files: 151643). Added tokens that are not
special (<tool_call>, <|fim_prefix|>, ...) are cut out of any text and kept when decoding, as in
Hugging Face. eos is tokenizer_config.json's eos_token when present, else <|endoftext|>; bos is None.
Text is NFC-normalized first, as Qwen's tokenizer.json says (its `normalizer`; read from the file) and
as Hugging Face's slow Qwen2Tokenizer always does for vocab.json + merges.txt.
Chat: ChatML with Qwen's default system prompt when the conversation has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from qattune.errors import QattuneError

from .byte_level import QWEN2_PATTERN, byte_level_ranks, parse_merge
from .chat_format import ChatMLFormat
from .files import require_file
from .tiktoken_base import UNICODE_FORMS, TiktokenTokenizer

QWEN2_5_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's added tokens in id order, with Hugging Face's `special` flag.
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *((t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                          "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                          "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")),
    *((t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")),
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QattuneError(f"{path} is not valid JSON ({err}); expected a Hugging Face tokenizer file") from None


def _pattern_of(pre_tokenizer: Optional[dict]) -> str:
    """The Split regex of a tokenizer.json pre-tokenizer (Qwen's is Sequence[Split, ByteLevel]), else Qwen2's."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])
    for step in steps:
        if step.get("type") == "Split" and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"]:
            return step["pattern"]["Regex"]
    return QWEN2_PATTERN


def _normalization_of(normalizer: Optional[dict], file: Path) -> Optional[str]:
    """The Unicode form of a tokenizer.json normalizer (None: none); other normalizers are refused."""
    steps = (normalizer or {}).get("normalizers", [normalizer] if normalizer else [])
    forms = [step.get("type") for step in steps]
    if not forms:
        return None
    if len(forms) == 1 and forms[0] in UNICODE_FORMS:
        return forms[0]
    raise QattuneError(f"{file}: normalizer {forms} is not supported; qwen2_5_tokenizer reads one of {UNICODE_FORMS}")


_Files = tuple[dict[str, int], list, list[tuple[str, int, bool]], str, Optional[str]]


def _from_tokenizer_json(file: Path) -> _Files:
    data = _read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise QattuneError(f"{file} has no byte-level BPE model (model.type {model.get('type') if isinstance(model, dict) else None!r}); "
                           "qwen2_5_tokenizer needs a Qwen/GPT-2 style tokenizer.json")
    added = [(t["content"], int(t["id"]), bool(t.get("special", True))) for t in data.get("added_tokens", [])]
    normalization = _normalization_of(data.get("normalizer"), file)
    return model["vocab"], model.get("merges", []), added, _pattern_of(data.get("pre_tokenizer")), normalization


def _from_vocab_and_merges(vocab_file: Path, merges_file: Path) -> _Files:
    vocab = _read_json(vocab_file)
    if not isinstance(vocab, dict):
        raise QattuneError(f"{vocab_file} is not a vocab.json (a JSON object of token -> id)")
    lines = require_file(str(merges_file), "merges file").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    config = vocab_file.parent / "tokenizer_config.json"
    if config.is_file() and "added_tokens_decoder" in (decoder := _read_json(config)):
        added = [(t["content"], int(i), bool(t.get("special", True))) for i, t in decoder["added_tokens_decoder"].items()]
    else:
        added = [(t, len(vocab) + i, special) for i, (t, special) in enumerate(QWEN2_5_ADDED_TOKENS)]
    return vocab, merges, added, QWEN2_PATTERN, "NFC"


def qwen2_5_tokenizer(path: str, merges_file: Optional[str] = None, max_seq_len: Optional[int] = None,
                      default_system_prompt: Optional[str] = QWEN2_5_DEFAULT_SYSTEM_PROMPT) -> TiktokenTokenizer:
    """The Qwen2.5 tokenizer from `tokenizer.json`, or from `vocab.json` with `merges_file` (merges.txt).

    `path` may also be a directory holding tokenizer.json (or vocab.json and merges.txt).
    `default_system_prompt`: the system message put first when a conversation has none (None: none).
    """
    file = Path(path).expanduser()
    if file.is_dir():
        if (file / "tokenizer.json").is_file() and merges_file is None:
            file = file / "tokenizer.json"
        else:
            merges_file = merges_file or str(file / "merges.txt")
            file = file / "vocab.json"
    require_file(str(file), "Qwen tokenizer file")
    if merges_file is None:
        vocab, merges, added, pattern, normalization = _from_tokenizer_json(file)
    else:
        vocab, merges, added, pattern, normalization = _from_vocab_and_merges(file, Path(merges_file).expanduser())

    special = {content: token_id for content, token_id, _ in added}
    ordinary = {t: i for t, i in vocab.items() if t not in special}
    ranks = byte_level_ranks(ordinary, [parse_merge(m, i, str(file)) for i, m in enumerate(merges)], where=str(file))
    for required in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        if required not in special:
            raise QattuneError(f"{file} lacks Qwen's special token {required}; is this a Qwen2.5 tokenizer?")
    eos = "<|endoftext|>"
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        eos_token = _read_json(config).get("eos_token")
        eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
        if eos_token in special:
            eos = eos_token
    return TiktokenTokenizer(
        name=f"qwen2.5:{file.name}",
        pattern=pattern,
        mergeable_ranks=ranks,
        special_tokens=special,
        added_tokens=[content for content, _, is_special in added if not is_special],
        bos_id=None,
        eos_id=special[eos],
        pad_id=special["<|endoftext|>"],
        stop_tokens=[special["<|im_end|>"], special["<|endoftext|>"]],
        chat_format=ChatMLFormat(default_system_prompt),
        max_seq_len=max_seq_len,
        normalization=normalization,
    )
