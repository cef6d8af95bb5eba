"""Tiny models and a byte-level chat tokenizer shared by the generation and eval tests."""

from __future__ import annotations

from typing import Sequence

import torch

from qattune.models import Transformer, llama
from qattune.tokenizers import ChatMLFormat, Tokenizer

SPECIALS = {"<|pad|>": 0, "<|bos|>": 1, "<|endoftext|>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
BYTE_OFFSET = len(SPECIALS)


def tiny_model(seed: int = 0, vocab_size: int = 272, max_seq_len: int = 256) -> Transformer:
    """A 2-layer, width-64 Llama with grouped-query attention and random weights (eval mode); the
    vocabulary (261 ids used by ByteChatTokenizer) is padded to 272, a multiple of 16 as int4 kernels need."""
    torch.manual_seed(seed)
    model = llama(vocab_size=vocab_size, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                  intermediate_dim=128, max_seq_len=max_seq_len)
    return model.eval()


class ByteChatTokenizer(Tokenizer):
    """Ids: five special tokens, then byte b -> b + 5; ChatML chat format; <|im_end|> ends a turn."""

    def __init__(self, with_bos: bool = True) -> None:
        self.special_tokens = dict(SPECIALS)
        self.bos_id = SPECIALS["<|bos|>"] if with_bos else None
        self.eos_id = SPECIALS["<|im_end|>"]
        self.pad_id = SPECIALS["<|pad|>"]
        self.stop_tokens = [SPECIALS["<|im_end|>"], SPECIALS["<|endoftext|>"]]
        self.vocab_size = 256 + BYTE_OFFSET
        self.max_seq_len = None
        self.chat_format = ChatMLFormat()

    def _encode_text(self, text: str, continuation: bool = False) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        names = {v: k for k, v in SPECIALS.items()}
        out, pending = [], bytearray()
        for i in ids:
            if i >= self.vocab_size:  # the model's padding ids (its vocabulary is larger): no text
                continue
            if i >= BYTE_OFFSET:
                pending.append(i - BYTE_OFFSET)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(names[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)
