"""Packing: fill fixed-length sequences with several documents, each attending only to itself.

A pack carries `tokens`, `labels`, `input_pos` (position ids restarting at 0 for every document) and
`document_ids` (which document each position belongs to). `padded_collate` turns the document ids into
a block-diagonal causal mask, so attention never crosses a document boundary.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .labels import IGNORE_INDEX
from .samples import Sample


class _PackBuilder:
    """Accumulates documents into one pack of `max_seq_len` positions."""

    def __init__(self, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len
        self.tokens: list[int] = []
        self.labels: list[int] = []
        self.input_pos: list[int] = []
        self.document_ids: list[int] = []
        self.num_documents = 0

    @property
    def free(self) -> int:
        return self.max_seq_len - len(self.tokens)

    def add(self, sample: Sample) -> None:
        n = len(sample.tokens)
        self.tokens += sample.tokens
        self.labels += sample.labels
        self.input_pos += list(range(n))
        self.document_ids += [self.num_documents] * n
        self.num_documents += 1

    def finish(self, pad_id: int) -> dict[str, torch.Tensor]:
        """Pad to full length; padding is its own document (it attends to itself, trains nothing)."""
        n_pad = self.free
        pos = list(range(n_pad))
        return {
            "tokens": torch.tensor(self.tokens + [pad_id] * n_pad, dtype=torch.long),
            "labels": torch.tensor(self.labels + [IGNORE_INDEX] * n_pad, dtype=torch.long),
            "input_pos": torch.tensor(self.input_pos + pos, dtype=torch.long),
            "document_ids": torch.tensor(self.document_ids + [self.num_documents] * n_pad, dtype=torch.long),
        }


def pack_samples(
    samples: Iterable[Sample], max_seq_len: int, pad_id: int, split_across_pack: bool
) -> list[dict[str, torch.Tensor]]:
    """Greedily pack samples, in order, into sequences of exactly `max_seq_len` tokens.

    With `split_across_pack`, a document that does not fit the space left fills it and continues in
    the next pack (positions restart there: it is a new sequence for the model); used for plain
    text, it leaves no padding except in the last pack. Without it, a document that does not fit starts a
    new pack, and a document longer than `max_seq_len` is an error.
    """
    packs: list[dict[str, torch.Tensor]] = []
    current = _PackBuilder(max_seq_len)
    for index, sample in enumerate(samples):
        if not split_across_pack and len(sample.tokens) > max_seq_len:
            raise QattuneError(
                f"sample {index} has {len(sample.tokens)} tokens, more than max_seq_len={max_seq_len}, "
                "and cannot be packed; raise max_seq_len or truncate the dataset"
            )
        rest = sample
        while rest.tokens:
            if current.free == 0 or (not split_across_pack and len(rest.tokens) > current.free):
                packs.append(current.finish(pad_id))
                current = _PackBuilder(max_seq_len)
            take = min(current.free, len(rest.tokens))
            current.add(Sample(rest.tokens[:take], rest.labels[:take]))
            rest = Sample(rest.tokens[take:], rest.labels[take:])
    if current.tokens:
        packs.append(current.finish(pad_id))
    return packs


class PackedDataset(Dataset):
    """A map-style dataset of packs built by `pack_samples`."""

    def __init__(self, samples: list[Sample], max_seq_len: int, pad_id: int, split_across_pack: bool) -> None:
        self.packs = pack_samples(samples, max_seq_len, pad_id, split_across_pack)
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.packs[index]
