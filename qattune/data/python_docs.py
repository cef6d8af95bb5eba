"""A corpus that is always there: the Python standard library's own documentation (`pydoc_data.topics`)."""

from __future__ import annotations

import zlib
from typing import Any, Literal, Optional

from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .builder import finish_dataset, resolve_max_seq_len
from .text_completion import text_samples

VALIDATION_SHARE = 10
"""One topic in this many (chosen by a CRC32 of its name, so the split never changes) is held out."""


def is_validation_topic(name: str) -> bool:
    """Whether the topic belongs to the validation split (deterministic, independent of dict order)."""
    return zlib.crc32(name.encode("utf-8")) % VALIDATION_SHARE == 0


def python_docs_rows(split: Literal["train", "validation"] = "train") -> list[dict[str, str]]:
    """The documentation topics of one split as rows `{"topic": name, "text": body}`, sorted by name."""
    from pydoc_data.topics import topics

    if split not in ("train", "validation"):
        raise QattuneError(f"python_docs split must be 'train' or 'validation', got {split!r}")
    want_validation = split == "validation"
    return [
        {"topic": name, "text": topics[name]}
        for name in sorted(topics)
        if is_validation_topic(name) == want_validation
    ]


def python_docs_dataset(
    tokenizer: Any,
    split: Literal["train", "validation"] = "train",
    max_seq_len: Optional[int] = None,
    packed: bool = False,
) -> Dataset:
    """Text-completion dataset over the CPython documentation topics (about 465k characters in all).

    The train and validation splits hold disjoint topics. Long topics are split at `max_seq_len`.
    """
    label = f"python_docs/{split}"
    samples = text_samples(python_docs_rows(split), "text", tokenizer, label=label)
    max_seq_len = resolve_max_seq_len(max_seq_len, tokenizer)
    return finish_dataset(
        samples, tokenizer, max_seq_len, packed, split_long_documents=True, source=label,
        split_across_pack=True,
    )
