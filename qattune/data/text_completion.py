"""Plain-text datasets: every token is a target; long documents are split, not truncated."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

from torch.utils.data import Dataset

from .builder import finish_dataset, resolve_max_seq_len
from .fields import column_text
from .samples import Sample
from .sources import Rows, dataset_label, load_rows, require_columns


def text_samples(rows: Rows, column: str, tokenizer: Any, add_eos: bool = True, label: str = "") -> list[Sample]:
    """One sample per non-blank row: BOS + text (surrounding newlines removed) + EOS, all trained.
    A null text is a blank row; a list or mapping is refused (`label` names the dataset)."""
    samples = []
    for index, row in enumerate(rows):
        text = column_text(row, column, f"dataset '{label}' row {index}", optional=True).strip("\n")
        if not text.strip():
            continue
        ids = tokenizer.encode(text, add_bos=True, add_eos=add_eos)
        samples.append(Sample.from_mask(ids, [True] * len(ids)))
    return samples


def text_completion_dataset(
    tokenizer: Any,
    source: str,
    column: str = "text",
    split: str = "train",
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    text_sample_by: Optional[Literal["line", "paragraph", "document"]] = None,
    data_files: Optional[Union[str, list[str]]] = None,
    add_eos: bool = True,
    split_across_pack: bool = True,
    name: Optional[str] = None,
    data_dir: Optional[str] = None,
    filter_fn: Optional[Callable[[dict[str, Any]], bool]] = None,
) -> Dataset:
    """Continued pre-training on raw text from a local text/JSON/JSONL/parquet/CSV file or a hub dataset.

    A text file gives one sample per `text_sample_by`: by default a line for `source: text` with
    `data_files` (as `datasets` and torchtune), a paragraph for a text file path. With `max_seq_len`
    (default: the tokenizer's), a document longer than it is split into consecutive pieces (nothing is
    dropped); with `packed=True` documents are packed into sequences of exactly `max_seq_len` tokens, a
    document continuing into the next pack unless `split_across_pack` is False (then long documents are
    cut into pieces first, and a piece that does not fit the space left starts a new pack).
    Loading arguments (`data_files`, `name`, `data_dir`, `filter_fn`): see `load_rows`.
    """
    label = dataset_label(source, data_files)
    rows = load_rows(source, split, text_sample_by, data_files, name=name, data_dir=data_dir, filter_fn=filter_fn)
    require_columns(rows, [column], label)
    samples = text_samples(rows, column, tokenizer, add_eos, label)
    max_seq_len = resolve_max_seq_len(max_seq_len, tokenizer)
    return finish_dataset(
        samples, tokenizer, max_seq_len, packed, split_long_documents=True, source=label,
        split_across_pack=split_across_pack,
    )
