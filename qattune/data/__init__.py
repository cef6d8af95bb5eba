"""qattune.data: dataset builders (text completion, instruct, chat, python_docs), packing, collate, loader."""

from .chat import chat_dataset
from .collate import block_causal_mask, padded_collate
from .instruct import alpaca_cleaned_dataset, alpaca_dataset, alpaca_prompt, input_output_dataset, instruct_dataset
from .labels import IGNORE_INDEX, next_token_labels
from .loader import StatefulDataLoader, build_dataloader, epoch_indices
from .packing import PackedDataset, pack_samples
from .python_docs import python_docs_dataset, python_docs_rows
from .samples import Sample, TokenizedDataset
from .sources import load_rows
from .text_completion import text_completion_dataset

__all__ = [
    "IGNORE_INDEX",
    "PackedDataset",
    "Sample",
    "StatefulDataLoader",
    "TokenizedDataset",
    "alpaca_cleaned_dataset",
    "alpaca_dataset",
    "alpaca_prompt",
    "block_causal_mask",
    "build_dataloader",
    "chat_dataset",
    "epoch_indices",
    "input_output_dataset",
    "instruct_dataset",
    "load_rows",
    "next_token_labels",
    "pack_samples",
    "padded_collate",
    "python_docs_dataset",
    "python_docs_rows",
    "text_completion_dataset",
]
