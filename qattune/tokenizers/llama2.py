"""Llama 2 tokenizer: a SentencePiece model, Llama 2's [INST] chat format."""

from __future__ import annotations

from typing import Optional, Sequence

from qattune.errors import QattuneError

from .base import Tokenizer
from .chat_format import ChatFormat, Llama2ChatFormat
from .files import require_file


class SentencePieceTokenizer(Tokenizer):
    """qattune's tokenizer interface over a SentencePiece model file.

    Control and unknown pieces (<s>, </s>, <unk>) are the special tokens. SentencePiece puts a dummy
    "▁" (space) before each encoded string when the model says so (Llama 2's does); a chat segment that
    continues the text before it drops its own leading space instead, so the ids equal those of the
    whole rendered string.
    """

    def __init__(self, path: str, max_seq_len: Optional[int] = None, chat_format: Optional[ChatFormat] = None):
        import sentencepiece

        file = require_file(path, "SentencePiece model")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(file))
        except (OSError, RuntimeError):
            raise QattuneError(f"{path} is not a SentencePiece model (a tiktoken ranks file? use "
                               "qattune.tokenizers.llama3_tokenizer for Llama 3)") from None
        sp = self._sp
        self.vocab_size = sp.GetPieceSize()
        self.special_tokens = {sp.IdToPiece(i): i for i in range(self.vocab_size)
                               if sp.IsControl(i) or sp.IsUnknown(i)}
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        if sp.eos_id() < 0:
            raise QattuneError(f"{path}: the SentencePiece model has no end-of-sequence piece; qattune needs one")
        self.eos_id = sp.eos_id()
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else 0
        self.stop_tokens = [self.eos_id]
        self.max_seq_len = max_seq_len
        self.chat_format = chat_format
        self._dummy_prefix = sp.EncodeAsPieces("a")[0].startswith("▁")

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"

    def _encode_text(self, text: str, continuation: bool = False) -> list[int]:
        if continuation and self._dummy_prefix and text.startswith(" "):
            text = text[1:]
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary are skipped. Special pieces are written as their
        text (e.g. "</s>") when `skip_special_tokens` is False."""
        ids = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
        special = set(self.special_tokens.values())
        if skip_special_tokens:
            return self._sp.DecodeIds([i for i in ids if i not in special])
        parts, run = [], []
        for i in ids:
            if i in special:
                parts += [self._sp.DecodeIds(run), self._sp.IdToPiece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.DecodeIds(run))
        return "".join(parts)


def llama2_tokenizer(path: str, max_seq_len: Optional[int] = None) -> SentencePieceTokenizer:
    """The Llama 2 tokenizer from its SentencePiece `tokenizer.model`; chat in Llama 2's [INST] format.

    bos <s>, eos </s> (also the only stop token), pad 0 (<unk>) when the model defines no pad piece.
    """
    tokenizer = SentencePieceTokenizer(path, max_seq_len=max_seq_len)
    sp = tokenizer._sp
    if tokenizer.bos_id is None:
        raise QattuneError(f"{path}: the SentencePiece model has no begin-of-sequence piece; Llama 2 chat needs one")
    tokenizer.chat_format = Llama2ChatFormat(bos=sp.IdToPiece(tokenizer.bos_id), eos=sp.IdToPiece(tokenizer.eos_id))
    return tokenizer
