"""A tokenizer on tiktoken's BPE: Llama 3, and byte-level BPE from GGUF or Hugging Face files.

tiktoken does the regex pre-tokenization and the merges in Rust. This class adds what tiktoken lacks:
special tokens as ids (never parsed from user text unless asked), "added" tokens that are always cut
out of the text (Hugging Face added tokens that are not special, e.g. Qwen's <tool_call>), Unicode
normalization of the text (Hugging Face's NFC/NFD/NFKC/NFKD normalizers: Qwen's is NFC), ids with no
token (skipped when decoding), and two inputs that make tiktoken's Rust code panic:
- a byte with no token of its own (SmolLM2's vocabulary lacks 21 rare bytes): such bytes are dropped,
  as Hugging Face's BPE drops characters it has no token for;
- a whitespace run of hundreds of thousands of characters (regex stack overflow): cut every 25,000
  characters, as Meta's Llama 3 tokenizer does.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Collection, Iterable, Mapping, Optional, Sequence

import tiktoken

from qattune.errors import QattuneError

from .base import Tokenizer, _special_splitter
from .chat_format import ChatFormat

MAX_WHITESPACE_RUN = 25_000
_LONG_WHITESPACE = re.compile(r"\s{%d,}" % MAX_WHITESPACE_RUN)
UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


class TiktokenTokenizer(Tokenizer):
    """BPE over tiktoken with qattune's tokenizer interface (see `base.Tokenizer`).

    `mergeable_ranks` maps token bytes to ids (ranks); `special_tokens` maps the text of every special
    and added token to its id; `added_tokens` names those among them that are cut out of any text and
    kept by `decode(skip_special_tokens=True)`. `normalization` (one of UNICODE_FORMS) is applied to
    the text between special and added tokens before pre-tokenization.
    """

    def __init__(
        self,
        *,
        name: str,
        pattern: str,
        mergeable_ranks: Mapping[bytes, int],
        special_tokens: Mapping[str, int],
        bos_id: Optional[int],
        eos_id: int,
        pad_id: int,
        stop_tokens: Iterable[int] = (),
        added_tokens: Collection[str] = (),
        chat_format: Optional[ChatFormat] = None,
        max_seq_len: Optional[int] = None,
        normalization: Optional[str] = None,
    ):
        self.name = name
        if normalization not in (None, *UNICODE_FORMS):
            raise QattuneError(f"{name}: Unicode normalization {normalization!r} is not one of {UNICODE_FORMS}")
        self.normalization = normalization
        self.special_tokens = dict(special_tokens)
        clash = set(self.special_tokens.values()) & set(mergeable_ranks.values())
        if clash:
            raise QattuneError(f"{name}: id {min(clash)} is both a special token and an ordinary token")
        try:
            self._encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=dict(mergeable_ranks),
                                               special_tokens={})
        except ValueError as err:  # the pre-tokenizer regex does not compile
            raise QattuneError(f"{name}: pre-tokenizer regex {pattern!r} is not usable by tiktoken ({err})") from None
        self._pattern = pattern
        self._added = tuple(added_tokens)
        self._decode_all: dict[int, bytes] = {i: b for b, i in mergeable_ranks.items()}
        self._decode_all.update({i: t.encode("utf-8") for t, i in self.special_tokens.items()})
        skipped = {self.special_tokens[t] for t in self.special_tokens if t not in self._added}
        self._decode_kept = {i: b for i, b in self._decode_all.items() if i not in skipped}
        self._missing_bytes = bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        self.vocab_size = max(self._decode_all) + 1
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        format_stops = [self.special_tokens[t] for t in getattr(chat_format, "stop_tokens", ()) if t in self.special_tokens]
        self.stop_tokens = list(dict.fromkeys([*stop_tokens, *format_stops, eos_id]))
        self.chat_format = chat_format
        self.max_seq_len = max_seq_len

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.name}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ encoding

    def _encode_text(self, text: str, continuation: bool = False) -> list[int]:
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        if not self._added:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for index, part in enumerate(_special_splitter(self._added).split(text)):
            if index % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self._encode_ordinary(part)
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._missing_bytes:
            raw = text.encode("utf-8", "surrogatepass")
            if len(raw.translate(None, self._missing_bytes)) != len(raw):
                return self._encode_dropping_missing_bytes(text)
        if len(text) >= MAX_WHITESPACE_RUN and _LONG_WHITESPACE.search(text):
            return [i for piece in _cut_long_whitespace(text) for i in self._encoding.encode_ordinary(piece)]
        return self._encoding.encode_ordinary(text)

    def _encode_dropping_missing_bytes(self, text: str) -> list[int]:
        """Slow path: pre-tokenize in Python, drop the bytes without a token, BPE each piece."""
        import regex  # a tiktoken dependency; supports the same \p{..} classes and lookarounds

        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids: list[int] = []
        for piece in regex.findall(self._pattern, text):
            raw = piece.encode("utf-8").translate(None, self._missing_bytes)
            if raw:
                ids += self._encoding._encode_single_piece(raw)
        return ids

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids with no token (e.g. a model's padded vocabulary rows) are skipped."""
        table = self._decode_kept if skip_special_tokens else self._decode_all
        return b"".join(filter(None, map(table.get, map(int, ids)))).decode("utf-8", errors="replace")


def _cut_long_whitespace(text: str) -> list[str]:
    """`text` cut inside whitespace runs so that no piece holds more than MAX_WHITESPACE_RUN of one run."""
    pieces, start = [], 0
    for run in _LONG_WHITESPACE.finditer(text):
        for cut in range(run.start() + MAX_WHITESPACE_RUN, run.end(), MAX_WHITESPACE_RUN):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces
