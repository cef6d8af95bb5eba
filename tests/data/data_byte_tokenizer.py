"""A byte-level tokenizer with the qattune tokenizer interface, for data tests (ids = byte + 3)."""

from __future__ import annotations

PAD, BOS, EOS = 0, 1, 2


class ByteTokenizer:
    pad_id, bos_id, eos_id = PAD, BOS, EOS
    stop_tokens = [EOS]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([BOS] if add_bos else []) + ids + ([EOS] if add_eos else [])

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def tokenize_messages(self, messages, add_generation_prompt: bool = False, truncate: bool = True):
        """Template: BOS, then per message `<role>` header (never trained) and content + EOS
        (trained for assistant messages). No length limit of its own, so `truncate` changes nothing."""
        ids, mask = [BOS], [False]
        for message in messages:
            header = self.encode(f"<{message['role']}>", add_bos=False, add_eos=False)
            body = self.encode(message["content"], add_bos=False, add_eos=True)
            ids += header + body
            mask += [False] * len(header) + [message["role"] == "assistant"] * len(body)
        return ids, mask
