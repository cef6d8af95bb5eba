"""Byte-level BPE (GPT-2 style) vocabularies mapped onto tiktoken, and the pre-tokenizer regexes.

Byte-level BPE files (GGUF metadata, Hugging Face tokenizer.json, vocab.json + merges.txt) spell each
token's bytes with GPT-2's printable stand-in characters (space is "Ġ"). tiktoken wants the raw bytes
and a rank per token, and merges the adjacent pair whose concatenation has the lowest rank. With
rank = token id this is the same algorithm as the files' ordered merge list whenever every merge makes
a token with a larger id than the merges before it, which holds for GPT-2-lineage vocabularies
(SmolLM2, Qwen2.5, Llama 3); `byte_level_ranks` checks it and warns when it does not hold.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Iterable, Mapping, Optional

from qattune.errors import QattuneError

logger = logging.getLogger(__name__)

# Pre-tokenizer regexes (tiktoken / fancy-regex syntax).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Hugging Face's Sequence[Digits(individual_digits=True), ByteLevel] (SmolLM2, StarCoder) as one regex:
# every digit is its own piece, and the GPT-2 regex runs on the text between digits (so whitespace
# before a digit ends its run as if the text ended there).
GPT2_DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# llama.cpp's `tokenizer.ggml.pre` names -> regex (names from llama.cpp's convert_hf_to_gguf.py).
GGUF_PRETOKENIZERS: dict[str, str] = {
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "jina-v1-en", "jina-v2-es", "jina-v2-de"), GPT2_PATTERN),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "exaone"), GPT2_DIGITS_PATTERN),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), LLAMA3_PATTERN),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), QWEN2_PATTERN),
}


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def token_bytes(token: str, where: str) -> bytes:
    """The raw bytes of byte-level token `token` ("Ġthe" -> b" the")."""
    table = char_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        raise QattuneError(f"{where}: token {token!r} is not a byte-level BPE token (it has a character outside "
                           "GPT-2's byte alphabet); is this a SentencePiece vocabulary?") from None


def byte_level_ranks(vocab: Mapping[str, int], merges: Optional[Iterable[tuple[str, str]]], where: str) -> dict[bytes, int]:
    """tiktoken mergeable ranks (token bytes -> id) of a byte-level BPE vocabulary.

    `vocab` holds the ordinary (non-special) tokens. `merges`, when given, is checked: every merge must
    join two tokens into a token of the vocabulary, and its result should have a larger id than the
    results of the merges before it (else tiktoken's order can differ from the merge list's; warned).
    """
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        raw = token_bytes(token, where)
        if raw in ranks:
            raise QattuneError(f"{where}: tokens {ranks[raw]} and {token_id} have the same bytes {raw!r}")
        ranks[raw] = token_id
    if merges is not None:
        previous, out_of_order = -1, 0
        for index, (left, right) in enumerate(merges):
            merged = vocab.get(left + right)
            if left not in vocab or right not in vocab or merged is None:
                raise QattuneError(f"{where}: merge {index} ({left!r} + {right!r}) uses or makes a token that is not "
                                   "in the vocabulary; the file is damaged or vocabulary and merges do not belong together")
            out_of_order += merged <= previous
            previous = max(previous, merged)
        if out_of_order:
            logger.warning("%s: %d merges make tokens with smaller ids than earlier merges; token ids may differ "
                           "from the reference BPE on rare words", where, out_of_order)
    return ranks


def parse_merge(merge, index: int, where: str) -> tuple[str, str]:
    """One merge, written "a b" (GGUF, merges.txt, older tokenizer.json) or ["a", "b"] (newer tokenizer.json)."""
    if isinstance(merge, str):
        parts = merge.split(" ")
    else:
        parts = list(merge)
    if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise QattuneError(f"{where}: merge {index} is {merge!r}; expected two tokens separated by one space")
    return parts[0], parts[1]
