"""Chat datasets: OpenAI-style `messages` and ShareGPT `conversations`, through the tokenizer's chat template."""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .builder import finish_dataset, resolve_max_seq_len
from .samples import Sample, fit_to_length
from .sources import load_rows, require_columns

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_openai_messages(conversation: Any, style: str, where: str) -> list[dict[str, str]]:
    """Normalize a conversation (a list of turns, or that list as a JSON string) to
    `[{"role": ..., "content": ...}]`; `style` "auto" looks at the first turn."""
    if isinstance(conversation, str):
        try:
            conversation = json.loads(conversation)
        except json.JSONDecodeError as err:
            raise QattuneError(f"{where} holds a string that is not a JSON list of turns ({err}); fix the data") from err
    if not conversation:
        raise QattuneError(f"{where} has an empty conversation; remove it or fix the data")
    if style == "auto":
        style = "sharegpt" if "from" in conversation[0] else "openai"
    messages = []
    for turn in conversation:
        if style == "sharegpt":
            speaker = turn.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise QattuneError(f"{where} has a ShareGPT turn from {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": str(turn.get("value", ""))})
        else:
            if "role" not in turn or "content" not in turn:
                raise QattuneError(f"{where} has a message without 'role'/'content' (keys: {sorted(turn)}); "
                                   "set conversation_style='sharegpt' for from/value turns")
            messages.append({"role": str(turn["role"]), "content": str(turn["content"] or "")})
    return messages


def with_system_prompt(messages: list[dict[str, str]], system_prompt: Optional[str]) -> list[dict[str, str]]:
    """Replace (or add) the system message when `system_prompt` is given."""
    if system_prompt is None:
        return messages
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": system_prompt}] + rest


def chat_dataset(
    tokenizer: Any,
    source: str,
    split: str = "train",
    conversation_column: str = "messages",
    conversation_style: Literal["auto", "openai", "sharegpt"] = "auto",
    new_system_prompt: Optional[str] = None,
    train_on_input: bool = False,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    truncate: bool = True,
    data_files: Optional[str] = None,
) -> Dataset:
    """Multi-turn chat fine-tuning; loss on assistant turns only unless `train_on_input`.

    Each row's `conversation_column` holds OpenAI-style messages (role/content) or ShareGPT turns
    (from/value; human->user, gpt->assistant). Conversations longer than `max_seq_len` are truncated
    (or refused with `truncate=False`); `max_seq_len` defaults to the tokenizer's. `new_system_prompt`
    replaces (or adds) the system message of every conversation.
    """
    max_seq_len = resolve_max_seq_len(max_seq_len, tokenizer)
    rows = load_rows(source, split, data_files=data_files)
    require_columns(rows, [conversation_column], source)
    samples = []
    for index, row in enumerate(rows):
        where = f"dataset '{source}' row {index}"
        messages = with_system_prompt(
            to_openai_messages(row[conversation_column], conversation_style, where), new_system_prompt
        )
        ids, assistant_mask = tokenizer.tokenize_messages(messages)
        trained = [True] * len(ids) if train_on_input else [bool(m) for m in assistant_mask]
        samples.append(fit_to_length(Sample.from_mask(ids, trained), max_seq_len, truncate, where))
    return finish_dataset(samples, tokenizer, max_seq_len, packed, split_long_documents=False, source=source)
