"""Instruction datasets (alpaca style): a prompt built from instruction/input, then the response."""

from __future__ import annotations

from typing import Any, Literal, Optional

from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .builder import finish_dataset, resolve_max_seq_len
from .samples import Sample, fit_to_length
from .sources import load_rows, require_columns

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


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """The Stanford Alpaca prompt; the variant without an input section when `input_text` is empty."""
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def instruct_sample(
    tokenizer: Any, instruction: str, input_text: str, output: str, template: str, train_on_input: bool
) -> Sample:
    """Tokenize one instruction example; the prompt is trained only when `train_on_input`."""
    if template == "chat":
        user = f"{instruction}\n\n{input_text}" if input_text else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        ids, assistant_mask = tokenizer.tokenize_messages(messages)
        trained = [True] * len(ids) if train_on_input else [bool(m) for m in assistant_mask]
        return Sample.from_mask(ids, trained)
    prompt_ids = tokenizer.encode(alpaca_prompt(instruction, input_text), add_bos=True, add_eos=False)
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
    template: Literal["alpaca", "chat"] = "alpaca",
    train_on_input: bool = False,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    truncate: bool = True,
    data_files: Optional[str] = None,
    column_map: Optional[dict[str, str]] = None,
) -> Dataset:
    """Supervised fine-tuning on instruction/input/output rows (alpaca and its many look-alikes).

    `template="alpaca"` uses the Alpaca prompt text; `"chat"` sends the example through the tokenizer's
    chat template as a user/assistant pair. Loss is on the response only unless `train_on_input`.
    Examples longer than `max_seq_len` are truncated (or refused with `truncate=False`).
    An `input_column` missing from the data is treated as empty when it is the default `input`.
    `column_map` (torchtune's spelling) maps "instruction"/"input"/"output" to the data's column names.
    `max_seq_len` defaults to the tokenizer's.
    """
    mapped = column_map or {}
    unknown = sorted(set(mapped) - {"instruction", "input", "output"})
    if unknown:
        raise QattuneError(f"instruct_dataset column_map has unknown key(s) {unknown}; use instruction, input, output")
    instruction_column = mapped.get("instruction", instruction_column)
    input_column = mapped.get("input", input_column)
    output_column = mapped.get("output", output_column)
    max_seq_len = resolve_max_seq_len(max_seq_len, tokenizer)
    rows = load_rows(source, split, data_files=data_files)
    columns = getattr(rows, "column_names", None) or list(rows[0].keys())
    use_input = input_column is not None and (input_column in columns or input_column != "input")
    require_columns(rows, [instruction_column, output_column] + ([input_column] if use_input else []), source)
    samples = []
    for index, row in enumerate(rows):
        sample = instruct_sample(
            tokenizer,
            str(row[instruction_column]),
            str(row[input_column] or "") if use_input else "",
            str(row[output_column]),
            template,
            train_on_input,
        )
        samples.append(fit_to_length(sample, max_seq_len, truncate, f"dataset '{source}' row {index}"))
    return finish_dataset(samples, tokenizer, max_seq_len, packed, split_long_documents=False, source=source)


def alpaca_dataset(
    tokenizer: Any,
    source: str = "tatsu-lab/alpaca",
    split: str = "train",
    train_on_input: bool = True,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    data_files: Optional[str] = None,
) -> Dataset:
    """Stanford Alpaca (52k instructions) with the Alpaca prompt; `source` may be a local copy
    (a JSON file of instruction/input/output rows) for offline use."""
    return instruct_dataset(
        tokenizer, source, split, train_on_input=train_on_input, max_seq_len=max_seq_len, packed=packed,
        data_files=data_files,
    )


def alpaca_cleaned_dataset(
    tokenizer: Any,
    source: str = "yahma/alpaca-cleaned",
    split: str = "train",
    train_on_input: bool = True,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    data_files: Optional[str] = None,
) -> Dataset:
    """The cleaned Alpaca set (yahma/alpaca-cleaned), same format and options as `alpaca_dataset`."""
    return alpaca_dataset(tokenizer, source, split, train_on_input, max_seq_len, packed, data_files)
