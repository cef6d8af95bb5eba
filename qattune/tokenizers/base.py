"""The interface every qattune tokenizer implements, and the chat tokenization they share.

A tokenizer turns text into token ids and back (`encode`, `decode`) and a conversation into ids plus a
mask of the tokens the assistant produced (`tokenize_messages`; training puts its loss there). Chat
formats (`chat_format.py`) describe a conversation as a list of `Segment`s; this module turns segments
into ids, so every backend (tiktoken, sentencepiece) gets masks and truncation the same way.

Rules every tokenizer follows:
- Special tokens come from ids, never from user text: `encode("<|eot_id|>")` encodes the characters.
  Pass `allowed_special="all"` (or a set of token strings) to parse them out of the text.
- `encode` never truncates (documents are split or packed by the data pipeline).
- `tokenize_messages` truncates to `max_seq_len` when it is set, keeping the first `max_seq_len` tokens
  and the matching mask entries. It never invents an end token: a conversation cut inside an assistant
  message ends without its end-of-turn token, so the model is not taught to stop mid-answer.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Collection, Literal, Mapping, Optional, Sequence, Union

from qattune.errors import QattuneError

if TYPE_CHECKING:
    from .chat_format import ChatFormat

ROLES = ("system", "user", "assistant")
AllowedSpecial = Union[Literal["all"], Collection[str]]


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation: a special token (by its text) or ordinary text.

    `assistant` marks what the assistant produced (the loss mask). Adjacent text segments with the
    same `assistant` flag are tokenized together, as one string; a change of flag is a token boundary.
    """

    text: str
    special: bool = False
    assistant: bool = False


def validate_messages(messages: Sequence[Mapping[str, object]]) -> list[dict[str, str]]:
    """Check that each message has a known `role` and a string `content`; return plain dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise QattuneError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise QattuneError(f"chat message {index} must be a dict with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise QattuneError(f"chat message {index} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise QattuneError(f"chat message {index} ({role}) has content of type {type(content).__name__}; it must be a string")
        out.append({"role": role, "content": content})
    return out


@lru_cache(maxsize=64)
def _special_splitter(tokens: tuple[str, ...]) -> re.Pattern:
    """A regex that captures any of `tokens`, longest first (so `<|a|>b` never shadows `<|a|>bc`)."""
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


class Tokenizer(ABC):
    """Common interface: encode/decode with bos/eos control, chat tokenization with an assistant mask.

    Attributes: `bos_id` (None when the model uses no begin-of-sequence token), `eos_id`, `pad_id`,
    `stop_tokens` (ids that end generation), `vocab_size` (one past the largest id), `max_seq_len`
    (None: no truncation), `special_tokens` (text -> id of every special token), `chat_format`.
    """

    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    stop_tokens: list[int]
    vocab_size: int
    max_seq_len: Optional[int]
    special_tokens: dict[str, int]
    chat_format: Optional[ChatFormat]

    # ------------------------------------------------------------------ backend hooks

    @abstractmethod
    def _encode_text(self, text: str, continuation: bool = False) -> list[int]:
        """Ids of ordinary text (no special-token parsing). `continuation`: the text directly follows
        other text of the same string (matters for SentencePiece's dummy prefix only)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped when `skip_special_tokens`."""

    # ------------------------------------------------------------------ shared behaviour

    def special_id(self, token: str) -> int:
        """The id of special token `token` (e.g. "<|eot_id|>")."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise QattuneError(f"{type(self).__name__} has no special token {token!r}") from None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, *,
               allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of `text`, with `bos_id` first (if any) and `eos_id` last when asked.

        Special-token strings in `text` are ordinary text unless named in `allowed_special` ("all" for all).
        """
        ids = self._encode_parsing_specials(text, allowed_special)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _encode_parsing_specials(self, text: str, allowed_special: AllowedSpecial) -> list[int]:
        if allowed_special == "all":
            allowed = tuple(self.special_tokens)
        else:
            allowed = (allowed_special,) if isinstance(allowed_special, str) else tuple(allowed_special)
            unknown = [t for t in allowed if t not in self.special_tokens]
            if unknown:
                raise QattuneError(f"allowed_special names {unknown[0]!r}, which is not a special token of "
                                   f"{type(self).__name__}")
        if not allowed:
            return self._encode_text(text)
        ids: list[int] = []
        for index, part in enumerate(_special_splitter(allowed).split(text)):
            if index % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self._encode_text(part)
        return ids

    def tokenize_messages(self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = False,
                          truncate: bool = True) -> tuple[list[int], list[bool]]:
        """Ids of a conversation and a mask that is True exactly on tokens the assistant produced
        (its message content and its end-of-turn token). `add_generation_prompt` appends the header
        that asks the model for the next assistant message. Truncated to `max_seq_len` when set, unless
        `truncate=False` (datasets apply their own length policy)."""
        ids: list[int] = []
        mask: list[bool] = []
        previous_was_text = False
        for segment in _merge_text(self._chat_format().segments(validate_messages(messages), add_generation_prompt)):
            if segment.special:
                piece = [self.special_id(segment.text)]
            else:
                piece = self._encode_text(segment.text, continuation=previous_was_text)
            previous_was_text = not segment.special
            ids += piece
            mask += [segment.assistant] * len(piece)
        if truncate and self.max_seq_len is not None and len(ids) > self.max_seq_len:
            ids, mask = ids[: self.max_seq_len], mask[: self.max_seq_len]
        return ids, mask

    def render_chat(self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = False) -> str:
        """The conversation as text in this tokenizer's chat format (what `tokenize_messages` encodes)."""
        segments = self._chat_format().segments(validate_messages(messages), add_generation_prompt)
        return "".join(segment.text for segment in segments)

    def _chat_format(self) -> ChatFormat:
        if self.chat_format is None:
            raise QattuneError(f"{type(self).__name__} has no chat format (its files name none qattune knows); "
                               "use a text-completion dataset, or a tokenizer with a chat format")
        return self.chat_format


def _merge_text(segments: Sequence[Segment]) -> list[Segment]:
    """Join adjacent text segments that share the `assistant` flag (they are tokenized as one string)."""
    merged: list[Segment] = []
    for segment in segments:
        last = merged[-1] if merged else None
        if (last is not None and not segment.special and not last.special
                and last.assistant == segment.assistant):
            merged[-1] = Segment(last.text + segment.text, assistant=segment.assistant)
        else:
            merged.append(segment)
    return merged
