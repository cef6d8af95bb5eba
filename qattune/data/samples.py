"""Tokenized samples: the common form every dataset builder produces, plus length handling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .labels import IGNORE_INDEX, next_token_labels


@dataclass
class Sample:
    """One training sequence: `tokens` and next-token `labels`, int32 arrays of equal length
    (compact: a dataset of millions of tokens stays small in memory)."""

    tokens: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_mask(cls, token_ids: Sequence[int], trained: Sequence[bool]) -> "Sample":
        """Build a sample whose targets are the tokens where `trained` is True."""
        labels = next_token_labels(token_ids, trained)
        return cls(np.asarray(token_ids, dtype=np.int32), labels.astype(np.int32))


def split_into_chunks(sample: Sample, max_seq_len: int) -> list[Sample]:
    """Cut a long document into consecutive pieces of at most `max_seq_len` tokens (nothing dropped).

    Labels were computed on the whole document, so a piece's last position still predicts the
    first token of the next piece, the true next token.
    """
    return [
        Sample(sample.tokens[start : start + max_seq_len], sample.labels[start : start + max_seq_len])
        for start in range(0, len(sample.tokens), max_seq_len)
    ]


def fit_to_length(sample: Sample, max_seq_len: Optional[int], truncate: bool, where: str) -> Sample:
    """Truncate a sample to `max_seq_len`, or refuse when truncation is off."""
    if max_seq_len is None or len(sample.tokens) <= max_seq_len:
        return sample
    if not truncate:
        raise QattuneError(
            f"{where} has {len(sample.tokens)} tokens, more than max_seq_len={max_seq_len}; "
            "raise max_seq_len or set truncate=True"
        )
    return Sample(sample.tokens[:max_seq_len], sample.labels[:max_seq_len])


def has_target(sample: Sample) -> bool:
    """Whether the sample has at least one trained label."""
    return bool((sample.labels != IGNORE_INDEX).any())


def drop_untrained(samples: Iterable[Sample]) -> list[Sample]:
    """Keep samples that have at least one trained label (others add nothing but padding)."""
    return [s for s in samples if has_target(s)]


class TokenizedDataset(Dataset):
    """A map-style dataset of pre-tokenized samples; items are dicts of int64 tensors."""

    def __init__(self, samples: list[Sample], pad_id: int) -> None:
        self.samples = samples
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        return {
            "tokens": torch.from_numpy(sample.tokens.astype(np.int64)),
            "labels": torch.from_numpy(sample.labels.astype(np.int64)),
        }
