"""Plain-text datasets: every token is a target; long documents are split, not truncated."""

from __future__ import annotations

from typing import Any, Literal, Optional

from torch.utils.data import Dataset

from .builder import finish_dataset, resolve_max_seq_len
from .samples import Sample
from .sources import Rows, load_rows, require_columns


def text_samples(rows: Rows, column: str, tokenizer: Any, add_eos: bool = True) -> list[Sample]:
    """One sample per non-blank row: BOS + text (surrounding newlines removed) + EOS, all trained."""
    samples = []
    for row in rows:
        text = str(row[column] or "").strip("\n")
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
    text_sample_by: Literal["line", "paragraph", "document"] = "paragraph",
    data_files: Optional[str] = None,
    add_eos: bool = True,
    split_across_pack: bool = True,
) -> Dataset:
    """Continued pre-training on raw text from a local text/JSON/JSONL/parquet/CSV file or a hub dataset.

    With `max_seq_len` (default: the tokenizer's), a document longer than it is split into
    consecutive pieces (nothing is dropped); with `packed=True` documents are packed into sequences of
    exactly `max_seq_len` tokens, a document continuing into the next pack unless `split_across_pack`
    is False (then long documents are cut into pieces first, and a piece that does not fit the space
    left starts a new pack).
    """
    rows = load_rows(source, split, text_sample_by, data_files)
    require_columns(rows, [column], source)
    samples = text_samples(rows, column, tokenizer, add_eos)
    max_seq_len = resolve_max_seq_len(max_seq_len, tokenizer)
    return finish_dataset(
        samples, tokenizer, max_seq_len, packed, split_long_documents=True, source=source,
        split_across_pack=split_across_pack,
    )
