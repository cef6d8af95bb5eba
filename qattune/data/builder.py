"""The last step every dataset builder shares: length policy, then a plain or a packed dataset."""

from __future__ import annotations

from typing import Any, Optional

from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .packing import PackedDataset
from .samples import Sample, TokenizedDataset, drop_untrained, split_into_chunks


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its eos id when it has none (padding is never trained on)."""
    pad_id = getattr(tokenizer, "pad_id", None)
    return int(pad_id if pad_id is not None else tokenizer.eos_id)


def resolve_max_seq_len(max_seq_len: Optional[int], tokenizer: Any) -> Optional[int]:
    """The dataset's `max_seq_len`, else the tokenizer's (torchtune configs set it there), else None."""
    return max_seq_len if max_seq_len is not None else getattr(tokenizer, "max_seq_len", None)


def finish_dataset(
    samples: list[Sample],
    tokenizer: Any,
    max_seq_len: Optional[int],
    packed: bool,
    split_long_documents: bool,
    source: str,
    split_across_pack: bool = False,
) -> Dataset:
    """Pack, or keep as plain samples.

    `split_long_documents` (plain text): a document longer than `max_seq_len` becomes consecutive
    pieces; when packing with `split_across_pack`, the packer does that cut itself, continuing a
    document into the next pack. Callers have already truncated samples that must not be split
    (prompt/response pairs).
    """
    if packed and max_seq_len is None:
        raise QattuneError(f"dataset '{source}': packed=True needs max_seq_len; set max_seq_len (e.g. 2048)")
    samples = drop_untrained(samples)
    if not samples:
        raise QattuneError(f"dataset '{source}' has no sample with a token to train on; check its columns and content")
    pad_id = pad_id_of(tokenizer)
    if split_long_documents and max_seq_len is not None and not (packed and split_across_pack):
        samples = drop_untrained([piece for s in samples for piece in split_into_chunks(s, max_seq_len)])
    if packed:
        return PackedDataset(samples, max_seq_len, pad_id, split_across_pack=split_across_pack)
    return TokenizedDataset(samples, pad_id)
