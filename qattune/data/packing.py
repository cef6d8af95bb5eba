"""Packing: fill fixed-length sequences with several documents, each attending only to itself.

A pack carries `tokens`, `labels`, `input_pos` (position ids restarting at 0 for every document) and
`document_ids` (which document each position belongs to). `padded_collate` turns the document ids into
a block-diagonal causal mask, so attention never crosses a document boundary.

Memory: packs are written straight into two preallocated int32 arrays (tokens, labels); only the
length of every document piece is kept besides, and `input_pos` / `document_ids` are derived from
those lengths when an item is read.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .labels import IGNORE_INDEX
from .samples import Sample

PACK_FIELDS = ("tokens", "labels", "input_pos", "document_ids")


def plan_packs(lengths: Iterable[int], max_seq_len: int, split_across_pack: bool) -> list[list[int]]:
    """The piece lengths of every pack when documents of `lengths` are packed greedily, in order.

    With `split_across_pack`, a document that does not fit the space left fills it and continues in
    the next pack; without it, a document that does not fit starts a new pack, and one longer than
    `max_seq_len` is an error.
    """
    packs: list[list[int]] = []
    current: list[int] = []
    free = max_seq_len
    for index, length in enumerate(lengths):
        if not split_across_pack and length > max_seq_len:
            raise QattuneError(
                f"sample {index} has {length} tokens, more than max_seq_len={max_seq_len}, "
                "and cannot be packed; raise max_seq_len or truncate the dataset"
            )
        while length:
            if free == 0 or (not split_across_pack and length > free):
                packs.append(current)
                current, free = [], max_seq_len
            take = min(free, length)
            current.append(take)
            free -= take
            length -= take
    if current:
        packs.append(current)
    return packs


def _fill(samples: Sequence[Sample], plan: list[list[int]], tokens: np.ndarray, labels: np.ndarray) -> None:
    """Copy the samples, piece by piece, into the rows of `tokens` / `labels` that `plan` lays out."""
    source = iter(samples)
    current, offset = None, 0
    for row, pieces in enumerate(plan):
        position = 0
        for length in pieces:
            while current is None or offset == len(current.tokens):
                current, offset = next(source), 0
            tokens[row, position : position + length] = current.tokens[offset : offset + length]
            labels[row, position : position + length] = current.labels[offset : offset + length]
            position += length
            offset += length


class PackedDataset(Dataset):
    """Samples packed into sequences of exactly `max_seq_len` tokens, stored as int32
    [num_packs, max_seq_len] tokens and labels plus each pack's document lengths.

    The padding at the end of a pack is its own document: it attends to itself and trains nothing.
    """

    def __init__(self, samples: Sequence[Sample], max_seq_len: int, pad_id: int, split_across_pack: bool) -> None:
        plan = plan_packs((len(s.tokens) for s in samples), max_seq_len, split_across_pack)
        self.tokens = np.full((len(plan), max_seq_len), pad_id, dtype=np.int32)
        self.labels = np.full((len(plan), max_seq_len), IGNORE_INDEX, dtype=np.int32)
        _fill(samples, plan, self.tokens, self.labels)
        self.piece_lengths = np.fromiter((n for pieces in plan for n in pieces), dtype=np.int32)
        self.pack_starts = np.cumsum([0] + [len(pieces) for pieces in plan], dtype=np.int64)
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def document_lengths(self, index: int) -> np.ndarray:
        """Lengths of the documents of pack `index`, the padding (possibly 0 long) last."""
        pieces = self.piece_lengths[self.pack_starts[index] : self.pack_starts[index + 1]].astype(np.int64)
        return np.append(pieces, self.max_seq_len - pieces.sum())

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pack {index} out of range for {len(self)} packs")
        index %= len(self)
        lengths = self.document_lengths(index)
        starts = np.cumsum(lengths) - lengths
        fields = {
            "tokens": self.tokens[index],
            "labels": self.labels[index],
            "input_pos": np.arange(self.max_seq_len) - np.repeat(starts, lengths),
            "document_ids": np.repeat(np.arange(len(lengths)), lengths),
        }
        return {name: torch.from_numpy(fields[name].astype(np.int64)) for name in PACK_FIELDS}


def pack_samples(
    samples: Sequence[Sample], max_seq_len: int, pad_id: int, split_across_pack: bool
) -> list[dict[str, torch.Tensor]]:
    """The items of `PackedDataset(samples, ...)` as a list: greedy packing, in order (see `plan_packs`).

    With `split_across_pack` (used for plain text) no padding is left except in the last pack; the
    positions restart where a document continues, since it is a new sequence for the model.
    """
    packed = PackedDataset(samples, max_seq_len, pad_id, split_across_pack)
    return [packed[index] for index in range(len(packed))]
