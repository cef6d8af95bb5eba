"""The last step every dataset builder shares: length policy, then a plain or a packed dataset."""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
from torch.utils.data import Dataset

from qattune.errors import QattuneError

from .labels import IGNORE_INDEX
from .packing import PackedDataset
from .samples import Sample, TokenizedDataset, drop_untrained, fit_to_length, has_target, split_into_chunks

log = logging.getLogger(__name__)


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its eos id when it has none (padding is never trained on)."""
    pad_id = getattr(tokenizer, "pad_id", None)
    return int(pad_id if pad_id is not None else tokenizer.eos_id)


def resolve_max_seq_len(max_seq_len: Optional[int], tokenizer: Any) -> Optional[int]:
    """The dataset's `max_seq_len`, else the tokenizer's (torchtune configs set it there), else None."""
    return max_seq_len if max_seq_len is not None else getattr(tokenizer, "max_seq_len", None)


def cut_ending_with(sample: Sample, max_seq_len: int, end_token: int) -> Sample:
    """torchtune's truncation: the first `max_seq_len` tokens, the last of them replaced by `end_token`
    (its eos), which is not trained on."""
    kept = max(max_seq_len - 2, 0)  # the position before the end token would predict it: untrained too
    tokens = np.append(sample.tokens[: max_seq_len - 1], end_token).astype(sample.tokens.dtype)
    labels = np.full(max_seq_len, IGNORE_INDEX, dtype=sample.labels.dtype)
    labels[:kept] = sample.labels[:kept]
    return Sample(tokens, labels)


def _fit(sample: Sample, max_seq_len: int, truncate: bool, where: str, truncation_end: Optional[int]) -> Sample:
    """The sample within `max_seq_len`: truncated (ending with `truncation_end` when given), or refused."""
    if truncate and truncation_end is not None and len(sample.tokens) > max_seq_len:
        return cut_ending_with(sample, max_seq_len, truncation_end)
    return fit_to_length(sample, max_seq_len, truncate, where)


def _keep_trained(rows: list[Sample], fitted: list[Sample], max_seq_len: Optional[int], source: str) -> list[Sample]:
    """The fitted samples that have a token to train on. Rows left out are counted in one warning per
    cause (none to begin with; all cut off by truncation); when none is left, the error names the cause."""
    untrained = [i for i, s in enumerate(rows) if not has_target(s)]
    cut = [i for i, (row, fit) in enumerate(zip(rows, fitted)) if has_target(row) and not has_target(fit)]
    kept = [fit for fit in fitted if has_target(fit)]
    if not kept and cut:
        raise QattuneError(f"dataset '{source}': no sample has a token to train on after truncation to "
                           f"max_seq_len={max_seq_len} (it cut off every response); raise max_seq_len")
    if not kept:
        raise QattuneError(f"dataset '{source}' has no sample with a token to train on; check its columns and content")
    if untrained:
        log.warning("dataset '%s': %d of %d samples have no token to train on (the first is row %d: with "
                    "train_on_input=False, a row with no assistant message) and are left out",
                    source, len(untrained), len(rows), untrained[0])
    if cut:
        log.warning("dataset '%s': %d of %d samples have no token to train on after truncation to max_seq_len=%d "
                    "and are left out", source, len(cut), len(rows), max_seq_len)
    return kept


def finish_dataset(
    samples: list[Sample],
    tokenizer: Any,
    max_seq_len: Optional[int],
    packed: bool,
    split_long_documents: bool,
    source: str,
    split_across_pack: bool = False,
    truncate: bool = True,
    truncation_end: Optional[int] = None,
) -> Dataset:
    """Apply the length policy, then pack or keep as plain samples; `samples[i]` is row i of `source`.

    `split_long_documents` (plain text): a document longer than `max_seq_len` becomes consecutive
    pieces; when packing with `split_across_pack`, the packer does that cut itself, continuing a
    document into the next pack. Otherwise (prompt/response pairs, conversations) a longer sample is
    truncated, or refused when `truncate` is False; `truncation_end` (torchtune's: its eos) replaces the
    last token of a truncated sample, untrained.
    """
    if packed and max_seq_len is None:
        raise QattuneError(f"dataset '{source}': packed=True needs max_seq_len; set dataset.max_seq_len or the "
                           "tokenizer's max_seq_len (e.g. 2048)")
    fitted = samples
    if not split_long_documents and max_seq_len is not None:
        fitted = [_fit(s, max_seq_len, truncate, f"dataset '{source}' row {i}", truncation_end)
                  for i, s in enumerate(samples)]
    samples = _keep_trained(samples, fitted, max_seq_len, source)
    pad_id = pad_id_of(tokenizer)
    if split_long_documents and max_seq_len is not None and not (packed and split_across_pack):
        samples = drop_untrained([piece for s in samples for piece in split_into_chunks(s, max_seq_len)])
    if packed:
        return PackedDataset(samples, max_seq_len, pad_id, split_across_pack=split_across_pack)
    return TokenizedDataset(samples, pad_id)
