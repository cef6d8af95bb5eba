"""Hugging Face byte-level BPE files, read into what `TiktokenTokenizer` takes.

A `tokenizer.json` (Qwen2.5's, Llama 3's Hugging Face copy, any GPT-2 style one) holds the vocabulary,
the merges, the added tokens with their `special` flags, the pre-tokenizer's Split regex and the
normalizer. Ordinary tokens become tiktoken ranks (rank = id, the merges checked against the
vocabulary); added tokens keep their ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Optional

from qattune.errors import QattuneError

from .byte_level import byte_level_ranks, parse_merge
from .tiktoken_base import UNICODE_FORMS


class BytePairFiles(NamedTuple):
    vocab: dict[str, int]
    merges: list
    added: list[tuple[str, int, bool]]  # (text, id, special)
    pattern: Optional[str]  # the pre-tokenizer's Split regex (None: the file has none)
    normalization: Optional[str]  # a Unicode form (NFC, ...) or None

    def ranks_and_specials(self, where: str) -> tuple[dict[bytes, int], dict[str, int]]:
        """tiktoken ranks of the ordinary tokens, and the id of every added token."""
        special = {text: token_id for text, token_id, _ in self.added}
        ordinary = {token: i for token, i in self.vocab.items() if token not in special}
        merges = [parse_merge(merge, i, where) for i, merge in enumerate(self.merges)]
        return byte_level_ranks(ordinary, merges, where=where), special

    def not_special(self) -> list[str]:
        """Added tokens that are not special (cut out of any text, kept when decoding, as in HF)."""
        return [text for text, _, special in self.added if not special]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QattuneError(f"{path} is not valid JSON ({err}); expected a Hugging Face tokenizer file") from None


def read_tokenizer_json(file: Path, reader: str) -> BytePairFiles:
    """The byte-level BPE in a `tokenizer.json`; `reader` (the builder's name) appears in errors."""
    data = read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        kind = model.get("type") if isinstance(model, dict) else None
        raise QattuneError(f"{file} has no byte-level BPE model (model.type {kind!r}); {reader} needs a GPT-2 style "
                           "tokenizer.json")
    added = [(t["content"], int(t["id"]), bool(t.get("special", True))) for t in data.get("added_tokens", [])]
    return BytePairFiles(model["vocab"], model.get("merges", []), added, _split_pattern(data.get("pre_tokenizer")),
                         _normalization(data.get("normalizer"), file, reader))


def _split_pattern(pre_tokenizer: Optional[dict]) -> Optional[str]:
    """The Split regex of a pre-tokenizer (Qwen's and Llama 3's are Sequence[Split, ByteLevel])."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])
    for step in steps:
        if step.get("type") == "Split" and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"]:
            return step["pattern"]["Regex"]
    return None


def _normalization(normalizer: Optional[dict], file: Path, reader: str) -> Optional[str]:
    """The Unicode form of a normalizer (None: none); other normalizers are refused."""
    steps = (normalizer or {}).get("normalizers", [normalizer] if normalizer else [])
    forms = [step.get("type") for step in steps]
    if not forms:
        return None
    if len(forms) == 1 and forms[0] in UNICODE_FORMS:
        return forms[0]
    raise QattuneError(f"{file}: normalizer {forms} is not supported; {reader} reads one of {UNICODE_FORMS}")
