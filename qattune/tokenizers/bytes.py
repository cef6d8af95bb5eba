"""A tokenizer that needs no file: one token per UTF-8 byte, plus ChatML's special tokens.

For tiny configs and tests that build everything on the fly. Ids 0-255 are the bytes; the special
tokens follow. Decoding replaces invalid UTF-8 (a sequence cut mid-character) with U+FFFD.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .base import Tokenizer
from .chat_format import ChatMLFormat

BYTE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255; `<|endoftext|>` is bos and eos, `<|im_end|>` ends a chat turn."""

    def __init__(self, max_seq_len: Optional[int] = None) -> None:
        self.special_tokens = {token: 256 + i for i, token in enumerate(BYTE_SPECIAL_TOKENS)}
        self.bos_id = self.special_tokens["<|endoftext|>"]
        self.eos_id = self.special_tokens["<|endoftext|>"]
        self.pad_id = self.special_tokens["<|pad|>"]
        self.stop_tokens = [self.eos_id, self.special_tokens["<|im_end|>"]]
        self.vocab_size = 256 + len(BYTE_SPECIAL_TOKENS)
        self.max_seq_len = max_seq_len
        self.chat_format = ChatMLFormat()

    def _encode_text(self, text: str, continuation: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        names = {i: t for t, i in self.special_tokens.items()}
        out, pending = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens and i in names:
                out.append(names[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


def byte_tokenizer(max_seq_len: Optional[int] = None) -> ByteTokenizer:
    """A file-free byte-level tokenizer (vocab 260) for tiny models and tests."""
    return ByteTokenizer(max_seq_len)
