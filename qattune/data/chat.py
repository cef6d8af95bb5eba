"""Chat datasets: OpenAI-style `messages` and ShareGPT `conversations`, through the tokenizer's chat template;
`torchtune_layout` masks and ends a conversation as torchtune's tokenizers do (`torchtune_chat_sample`)."""

from __future__ import annotations

import json
from typing import Any, Callable, Literal, Optional, Sequence, Union

from torch.utils.data import Dataset

from qattune.errors import QattuneError
from qattune.tokenizers.base import ROLES

from .builder import finish_dataset, resolve_max_seq_len
from .fields import content_text, text_of
from .samples import Sample
from .sources import dataset_label, load_rows, require_columns

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _turns(conversation: Any, where: str) -> list[dict[str, Any]]:
    """The conversation as a non-empty list of turn mappings (a JSON string holding one is parsed)."""
    if isinstance(conversation, str):
        try:
            conversation = json.loads(conversation)
        except json.JSONDecodeError as err:
            raise QattuneError(f"{where} holds a string that is not a JSON list of turns ({err}); fix the data") from err
    if not isinstance(conversation, list) or not conversation:
        found = "an empty conversation" if isinstance(conversation, list) else f"a {type(conversation).__name__}"
        raise QattuneError(f"{where} has {found}, not a list of turns; remove the row or fix the data")
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise QattuneError(f"{where} turn {index} is a {type(turn).__name__}, not a mapping; fix the data")
    return conversation


def _sharegpt_message(turn: dict[str, Any], where: str, index: int) -> dict[str, str]:
    speaker = turn.get("from")
    if speaker not in SHAREGPT_ROLES:
        raise QattuneError(f"{where} has a ShareGPT turn ({index}) from {speaker!r}; "
                           f"expected one of {sorted(SHAREGPT_ROLES)}")
    return {"role": SHAREGPT_ROLES[speaker], "content": text_of(turn.get("value"), f"{where} turn {index} value")}


def _openai_message(turn: dict[str, Any], where: str, index: int) -> dict[str, str]:
    role = turn.get("role")
    if role is None and turn.get("content") is None:
        raise QattuneError(f"{where} has a message without 'role'/'content' (turn {index}, keys: {sorted(turn)}); "
                           "set conversation_style='sharegpt' for from/value turns")
    if role not in ROLES:
        raise QattuneError(f"{where} turn {index} has role {role!r}; use one of {', '.join(ROLES)} "
                           "(conversation_style='sharegpt' reads from/value turns)")
    return {"role": role, "content": content_text(turn.get("content"), f"{where} turn {index}")}


def to_openai_messages(conversation: Any, style: str, where: str) -> list[dict[str, str]]:
    """Normalize a conversation (a list of turns, or that list as a JSON string) to
    `[{"role": ..., "content": ...}]`; `style` "auto" looks at the first turn. A null value, an unknown
    role and a non-text content part are refused, naming `where` (the row) and the turn."""
    turns = _turns(conversation, where)
    if style == "auto":
        style = "sharegpt" if turns[0].get("from") is not None else "openai"
    to_message = _sharegpt_message if style == "sharegpt" else _openai_message
    return [to_message(turn, where, index) for index, turn in enumerate(turns)]


def with_system_prompt(messages: list[dict[str, str]], system_prompt: Optional[str]) -> list[dict[str, str]]:
    """Replace (or add) the system message when `system_prompt` is given."""
    if system_prompt is None:
        return messages
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": system_prompt}] + rest


def chat_sample(tokenizer: Any, messages: list[dict[str, str]], train_on_input: bool) -> Sample:
    """One conversation through the tokenizer's chat template, untruncated (the dataset applies its
    length limit); the assistant's tokens are trained, every token with `train_on_input`."""
    ids, assistant_mask = tokenizer.tokenize_messages(messages, truncate=False)
    trained = [True] * len(ids) if train_on_input else [bool(m) for m in assistant_mask]
    return Sample.from_mask(ids, trained)


def torchtune_trained(messages: list[dict[str, str]], train_on_input: bool,
                      new_system_prompt: Optional[str]) -> list[bool]:
    """Which messages torchtune trains (0.6.1's OpenAIToMessages, ShareGPTToMessages, InputOutputToMessages):
    the assistant's; the others only with `train_on_input`, except the system message `new_system_prompt`
    put first (`with_system_prompt`), which is never trained. A system message of the data is trained with
    `train_on_input`, as torchtune does."""
    injected = new_system_prompt is not None
    return [message["role"] == "assistant" or (train_on_input and not (injected and index == 0))
            for index, message in enumerate(messages)]


def _prefix_length(tokenizer: Any, messages: list[dict[str, str]], ids: list[int]) -> Optional[int]:
    """How many of the conversation's `ids` the first `len(messages)` messages take, or None when the chat
    format does not end them on a token boundary of their own (Llama 2 folds a system message into the
    next user message, a dated Llama 3 system message holds the chat's own)."""
    try:
        prefix = tokenizer.tokenize_messages(messages, truncate=False)[0]
    except QattuneError:  # a format that cannot lay the prefix out alone (Llama 2: a system message alone)
        return None
    return len(prefix) if ids[: len(prefix)] == list(prefix) else None


def torchtune_chat_sample(tokenizer: Any, messages: list[dict[str, str]], trained: Sequence[bool]) -> Sample:
    """A conversation as torchtune's tokenizers mask it: each message whole (its header, content and end of
    turn) trained when its `trained` flag is set (`torchtune_trained`), what the template puts before the
    first message (bos) untrained, then the tokenizer's eos, untrained, unless the sample already ends with
    it or the last message is an answer ending with it (Llama 2's `</s>`, ChatML's `<|im_end|>`). Template
    text that a format merges into a message (a Llama 2 system message inside the user's `[INST]`) takes
    that message's flag, as torchtune's Llama 2 template does. (torchtune's truncation:
    `finish_dataset(truncation_end=eos)`.)"""
    ids, assistant_mask = tokenizer.tokenize_messages(messages, truncate=False)
    ids = list(ids)
    starts = {0: _prefix_length(tokenizer, [], ids) or 0}  # message index -> its first token
    for index in range(1, len(messages)):
        if trained[index] != trained[index - 1]:  # only a change of flag needs the boundary
            start = _prefix_length(tokenizer, messages[:index], ids)
            if start is None:  # merged with the message before: the span takes this message's flag
                starts[index] = starts.pop(max(starts))
            else:
                starts[index] = start
    flags = [False] * len(ids)
    bounds = sorted(starts.items(), key=lambda item: item[1]) + [(None, len(ids))]
    for (index, start), (_, end) in zip(bounds, bounds[1:]):
        flags[start:end] = [trained[index]] * (end - start)
    answer_ids = [token for token, in_answer in zip(ids, assistant_mask) if in_answer]
    ends_with_eos = ids[-1:] == [tokenizer.eos_id] or (
        messages[-1]["role"] == "assistant" and answer_ids[-1:] == [tokenizer.eos_id])
    if not ends_with_eos:
        ids, flags = ids + [tokenizer.eos_id], flags + [False]
    return Sample.from_mask(ids, flags)


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
    data_files: Optional[Union[str, list[str]]] = None,
    name: Optional[str] = None,
    data_dir: Optional[str] = None,
    filter_fn: Optional[Callable[[dict[str, Any]], bool]] = None,
    torchtune_layout: bool = False,
) -> Dataset:
    """Multi-turn chat fine-tuning; loss on assistant turns only unless `train_on_input`.

    Each row's `conversation_column` holds OpenAI-style messages (role/content; content a string or a
    list of text parts) or ShareGPT turns (from/value; human->user, gpt->assistant). Conversations
    longer than `max_seq_len` (default: the tokenizer's) are truncated, or refused with
    `truncate=False`. `new_system_prompt` replaces (or adds) the system message of every conversation.
    `torchtune_layout` masks, ends and truncates as torchtune's `chat_dataset` does (`torchtune_chat_sample`:
    whole messages with their headers, the tokenizer's eos after the chat, a truncated sample ending with it;
    the `new_system_prompt` message is never trained).
    Loading arguments (`data_files`, `name`, `data_dir`, `filter_fn`): see `load_rows`.
    """
    label = dataset_label(source, data_files)
    rows = load_rows(source, split, data_files=data_files, name=name, data_dir=data_dir, filter_fn=filter_fn)
    require_columns(rows, [conversation_column], label)
    samples = []
    for index, row in enumerate(rows):
        where = f"dataset '{label}' row {index}"
        messages = with_system_prompt(to_openai_messages(row[conversation_column], conversation_style, where),
                                      new_system_prompt)
        if torchtune_layout:
            trained = torchtune_trained(messages, train_on_input, new_system_prompt)
            samples.append(torchtune_chat_sample(tokenizer, messages, trained))
        else:
            samples.append(chat_sample(tokenizer, messages, train_on_input))
    max_seq_len = resolve_max_seq_len(max_seq_len, tokenizer)
    return finish_dataset(samples, tokenizer, max_seq_len, packed, split_long_documents=False, source=label,
                          truncate=truncate, truncation_end=tokenizer.eos_id if torchtune_layout else None)
