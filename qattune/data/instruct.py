"""Instruction datasets: alpaca style (a prompt built from instruction/input, then the response, as plain
text or as a chat), and torchtune's `instruct_dataset` (input -> user message, output -> assistant message,
chat template). `torchtune_layout` masks and ends chat samples as torchtune's tokenizers do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Union

from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .builder import finish_dataset, resolve_max_seq_len
from .chat import chat_sample, torchtune_chat_sample, torchtune_trained, with_system_prompt
from .fields import column_text
from .samples import Sample
from .sources import dataset_label, load_rows, require_columns

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "alpaca_chat", "chat")


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """The Stanford Alpaca prompt; the variant without an input section when `input_text` is empty."""
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def mapped_columns(column_map: Optional[Mapping[str, str]], defaults: dict[str, str], builder: str) -> dict[str, str]:
    """torchtune's `column_map` (field -> the data's column name) over the `defaults` columns."""
    mapped = dict(column_map or {})
    unknown = sorted(set(mapped) - set(defaults))
    if unknown:
        raise QattuneError(f"{builder} column_map has unknown key(s) {unknown}; use {', '.join(defaults)}")
    return {**defaults, **mapped}


@dataclass(frozen=True)
class InstructLayout:
    """How an instruction/input/output row becomes a sample; the arguments of `instruct_dataset`."""

    template: str = "alpaca"
    train_on_input: bool = False
    system_prompt: Optional[str] = None
    torchtune_layout: bool = False

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise QattuneError(f"template={self.template!r} is not an instruct template; use one of "
                               f"{', '.join(TEMPLATES)}")
        if self.template == "alpaca" and (self.system_prompt is not None or self.torchtune_layout):
            given = "new_system_prompt" if self.system_prompt is not None else "torchtune_layout"
            raise QattuneError(f"{given} needs a chat template (the Alpaca text has no messages); "
                               f"set template=alpaca_chat or template=chat, or remove {given}")

    def user_text(self, instruction: str, input_text: str) -> str:
        """The user message: the Alpaca prompt (alpaca_chat), or the instruction then the input (chat)."""
        if self.template == "alpaca_chat":
            return alpaca_prompt(instruction, input_text)
        return f"{instruction}\n\n{input_text}" if input_text else instruction

    def chat(self, tokenizer: Any, user: str, answer: str) -> Sample:
        """A user/assistant exchange (after the system prompt, if any) through the chat template."""
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages = with_system_prompt(messages, self.system_prompt)
        if self.torchtune_layout:
            trained = torchtune_trained(messages, self.train_on_input, self.system_prompt)
            return torchtune_chat_sample(tokenizer, messages, trained)
        return chat_sample(tokenizer, messages, self.train_on_input)

    def sample(self, tokenizer: Any, instruction: str, input_text: str, output: str) -> Sample:
        """Tokenize one instruction example; the prompt is trained only when `train_on_input`."""
        if self.template == "alpaca":
            return alpaca_text_sample(tokenizer, alpaca_prompt(instruction, input_text), output, self.train_on_input)
        return self.chat(tokenizer, self.user_text(instruction, input_text), output)


def alpaca_text_sample(tokenizer: Any, prompt: str, output: str, train_on_input: bool) -> Sample:
    """Stanford Alpaca's plain text (as axolotl's `alpaca` type): bos, prompt, response, eos."""
    prompt_ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    response_ids = tokenizer.encode(output, add_bos=False, add_eos=True)
    trained = [train_on_input] * len(prompt_ids) + [True] * len(response_ids)
    return Sample.from_mask(prompt_ids + response_ids, trained)


def instruct_dataset(
    tokenizer: Any,
    source: str,
    split: str = "train",
    instruction_column: str = "instruction",
    input_column: Optional[str] = "input",
    output_column: str = "output",
    template: Literal["alpaca", "alpaca_chat", "chat"] = "alpaca",
    train_on_input: bool = False,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    truncate: bool = True,
    data_files: Optional[Union[str, list[str]]] = None,
    column_map: Optional[dict[str, str]] = None,
    new_system_prompt: Optional[str] = None,
    torchtune_layout: bool = False,
    name: Optional[str] = None,
    data_dir: Optional[str] = None,
    filter_fn: Optional[Callable[[dict[str, Any]], bool]] = None,
) -> Dataset:
    """Supervised fine-tuning on instruction/input/output rows (alpaca and its many look-alikes).

    `template="alpaca"`: the Alpaca prompt as plain text (bos, prompt, response, eos). The chat templates
    send a user/assistant pair through the tokenizer's chat template, after `new_system_prompt` as a
    system message when given: `"alpaca_chat"` with the Alpaca prompt as the user message (torchtune's
    alpaca layout), `"chat"` with the instruction, a blank line, then the input. `torchtune_layout`
    (chat templates) masks and ends the sample as torchtune's tokenizers do: see `torchtune_chat_sample`.
    Loss is on the response only unless `train_on_input`.
    Examples longer than `max_seq_len` (default: the tokenizer's) are truncated, or refused with
    `truncate=False`. An `input_column` missing from the data is treated as empty when it is the
    default `input`, and a null input is empty; a null instruction or output is refused.
    `column_map` (torchtune's spelling) maps "instruction"/"input"/"output" to the data's column names.
    Loading arguments (`data_files`, `name`, `data_dir`, `filter_fn`): see `load_rows`.
    """
    layout = InstructLayout(template, train_on_input, new_system_prompt, torchtune_layout)
    columns = mapped_columns(
        column_map, {"instruction": instruction_column, "input": input_column, "output": output_column}, "instruct_dataset"
    )
    label = dataset_label(source, data_files)
    rows = load_rows(source, split, data_files=data_files, name=name, data_dir=data_dir, filter_fn=filter_fn)
    input_column = columns["input"]
    use_input = input_column is not None and (input_column in rows.column_names or input_column != "input")
    require_columns(rows, [columns["instruction"], columns["output"]] + ([input_column] if use_input else []), label)
    samples = []
    for index, row in enumerate(rows):
        where = f"dataset '{label}' row {index}"
        samples.append(layout.sample(
            tokenizer,
            column_text(row, columns["instruction"], where),
            column_text(row, input_column, where, optional=True) if use_input else "",
            column_text(row, columns["output"], where),
        ))
    max_seq_len = resolve_max_seq_len(max_seq_len, tokenizer)
    return finish_dataset(samples, tokenizer, max_seq_len, packed, split_long_documents=False, source=label,
                          truncate=truncate, truncation_end=tokenizer.eos_id if torchtune_layout else None)


def input_output_dataset(
    tokenizer: Any,
    source: str,
    split: str = "train",
    column_map: Optional[dict[str, str]] = None,
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
    """torchtune's `instruct_dataset`: each row's `input` is a user message and its `output` the assistant's
    answer, through the tokenizer's chat template (no Alpaca text).

    `column_map` maps "input"/"output" to the data's column names; `new_system_prompt` adds a system
    message first. Loss is on the answer only unless `train_on_input`. Null values are refused.
    `torchtune_layout` masks, ends and truncates as torchtune does (see `torchtune_chat_sample`; the
    `new_system_prompt` message is never trained). Length and loading arguments as in `chat_dataset`.
    """
    layout = InstructLayout("chat", train_on_input, new_system_prompt, torchtune_layout)
    columns = mapped_columns(column_map, {"input": "input", "output": "output"}, "input_output_dataset")
    label = dataset_label(source, data_files)
    rows = load_rows(source, split, data_files=data_files, name=name, data_dir=data_dir, filter_fn=filter_fn)
    require_columns(rows, [columns["input"], columns["output"]], label)
    samples = []
    for index, row in enumerate(rows):
        where = f"dataset '{label}' row {index}"
        user, answer = column_text(row, columns["input"], where), column_text(row, columns["output"], where)
        samples.append(layout.chat(tokenizer, user, answer))
    max_seq_len = resolve_max_seq_len(max_seq_len, tokenizer)
    return finish_dataset(samples, tokenizer, max_seq_len, packed, split_long_documents=False, source=label,
                          truncate=truncate, truncation_end=tokenizer.eos_id if torchtune_layout else None)


def alpaca_dataset(
    tokenizer: Any,
    source: str = "tatsu-lab/alpaca",
    split: str = "train",
    train_on_input: bool = True,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    data_files: Optional[Union[str, list[str]]] = None,
    column_map: Optional[dict[str, str]] = None,
    truncate: bool = True,
    template: Literal["alpaca", "alpaca_chat"] = "alpaca",
    torchtune_layout: bool = False,
    name: Optional[str] = None,
    data_dir: Optional[str] = None,
    filter_fn: Optional[Callable[[dict[str, Any]], bool]] = None,
) -> Dataset:
    """Stanford Alpaca (52k instructions) with the Alpaca prompt; `source` may be a local copy
    (a JSON file of instruction/input/output rows) for offline use. `template`: the Alpaca prompt as
    plain text (`alpaca`), or as the user message of a chat (`alpaca_chat`, with `torchtune_layout`
    torchtune's `alpaca_dataset`). Arguments as in `instruct_dataset`."""
    return instruct_dataset(
        tokenizer, source, split, column_map=column_map, train_on_input=train_on_input, max_seq_len=max_seq_len,
        packed=packed, truncate=truncate, template=template, torchtune_layout=torchtune_layout,
        data_files=data_files, name=name, data_dir=data_dir, filter_fn=filter_fn,
    )


def alpaca_cleaned_dataset(
    tokenizer: Any,
    source: str = "yahma/alpaca-cleaned",
    split: str = "train",
    train_on_input: bool = True,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    data_files: Optional[Union[str, list[str]]] = None,
    column_map: Optional[dict[str, str]] = None,
    truncate: bool = True,
    template: Literal["alpaca", "alpaca_chat"] = "alpaca",
    torchtune_layout: bool = False,
    name: Optional[str] = None,
    data_dir: Optional[str] = None,
    filter_fn: Optional[Callable[[dict[str, Any]], bool]] = None,
) -> Dataset:
    """The cleaned Alpaca set (yahma/alpaca-cleaned), same format and options as `alpaca_dataset`."""
    return alpaca_dataset(
        tokenizer, source, split, column_map=column_map, train_on_input=train_on_input, max_seq_len=max_seq_len,
        packed=packed, truncate=truncate, template=template, torchtune_layout=torchtune_layout,
        data_files=data_files, name=name, data_dir=data_dir, filter_fn=filter_fn,
    )
