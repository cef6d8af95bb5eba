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


def finish_dataset(
    samples: list[Sample],
    tokenizer: Any,
    max_seq_len: Optional[int],
    packed: bool,
    split_long_documents: bool,
    source: str,
) -> Dataset:
    """Pack, or keep as plain samples; long documents are split when `split_long_documents`.

    Callers have already truncated samples that must not be split (prompt/response pairs).
    """
    if packed and max_seq_len is None:
        raise QattuneError(f"dataset '{source}': packed=True needs max_seq_len; set max_seq_len (e.g. 2048)")
    samples = drop_untrained(samples)
    if not samples:
        raise QattuneError(f"dataset '{source}' has no sample with a token to train on; check its columns and content")
    pad_id = pad_id_of(tokenizer)
    if packed:
        return PackedDataset(samples, max_seq_len, pad_id, split_across_pack=split_long_documents)
    if split_long_documents and max_seq_len is not None:
        samples = [piece for s in samples for piece in split_into_chunks(s, max_seq_len)]
        samples = drop_untrained(samples)
    return TokenizedDataset(samples, pad_id)
