"""Packing: fill fixed-length sequences with several documents, each attending only to itself.

A pack carries `tokens`, `labels`, `input_pos` (position ids restarting at 0 for every document) and
`document_ids` (which document each position belongs to). `padded_collate` turns the document ids into
a block-diagonal causal mask, so attention never crosses a document boundary.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .labels import IGNORE_INDEX
from .samples import Sample

PACK_FIELDS = ("tokens", "labels", "input_pos", "document_ids")


class _PackBuilder:
    """Accumulates documents into one pack of `max_seq_len` positions."""

    def __init__(self, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len
        self.pieces: list[Sample] = []
        self.length = 0

    @property
    def free(self) -> int:
        return self.max_seq_len - self.length

    def add(self, sample: Sample) -> None:
        self.pieces.append(sample)
        self.length += len(sample.tokens)

    def finish(self, pad_id: int) -> dict[str, torch.Tensor]:
        """Pad to full length; padding is its own document (it attends to itself, trains nothing)."""
        n_pad = self.free
        lengths = [len(p.tokens) for p in self.pieces] + [n_pad]
        fields = {
            "tokens": np.concatenate([p.tokens for p in self.pieces] + [np.full(n_pad, pad_id)]),
            "labels": np.concatenate([p.labels for p in self.pieces] + [np.full(n_pad, IGNORE_INDEX)]),
            "input_pos": np.concatenate([np.arange(n) for n in lengths]),
            "document_ids": np.repeat(np.arange(len(lengths)), lengths),
        }
        return {name: torch.from_numpy(values.astype(np.int64)) for name, values in fields.items()}


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
        while len(rest.tokens):
            if current.free == 0 or (not split_across_pack and len(rest.tokens) > current.free):
                packs.append(current.finish(pad_id))
                current = _PackBuilder(max_seq_len)
            take = min(current.free, len(rest.tokens))
            current.add(Sample(rest.tokens[:take], rest.labels[:take]))
            rest = Sample(rest.tokens[take:], rest.labels[take:])
    if current.length:
        packs.append(current.finish(pad_id))
    return packs


class PackedDataset(Dataset):
    """A map-style dataset of packs built by `pack_samples`, stored as int32 [num_packs, max_seq_len]."""

    def __init__(self, samples: list[Sample], max_seq_len: int, pad_id: int, split_across_pack: bool) -> None:
        packs = pack_samples(samples, max_seq_len, pad_id, split_across_pack)
        self.fields = {name: torch.stack([p[name] for p in packs]).to(torch.int32) for name in PACK_FIELDS}
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return self.fields["tokens"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: values[index].long() for name, values in self.fields.items()}
