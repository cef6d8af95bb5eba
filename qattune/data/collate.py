"""Collate: right-pad plain samples, stack packs and build their block-diagonal causal mask."""

from __future__ import annotations

from typing import Optional

import torch

from qattune.errors import QattuneError

from .labels import IGNORE_INDEX

MODEL_INPUT_KEYS = ("input_pos", "mask")
"""Batch entries the model takes as keyword inputs besides `tokens` (packed batches carry both)."""


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, S, S]: query i may attend to key j iff j <= i and both are in the same document."""
    seq_len = document_ids.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    return same_document & causal


def padded_collate(
    batch: list[dict[str, torch.Tensor]],
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
    max_seq_len: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Make a batch from dataset items.

    Plain items (`tokens`, `labels`) are right-padded to the longest item with `pad_id` / `ignore_index`;
    right padding is invisible to a causal model, so no mask is needed. Packed items (with
    `document_ids`) are stacked and get `input_pos` and a block-diagonal causal `mask`.
    """
    if not batch:
        raise ValueError("padded_collate got an empty batch")
    lengths = [item["tokens"].numel() for item in batch]
    if max_seq_len is not None and max(lengths) > max_seq_len:
        raise QattuneError(
            f"a batch item has {max(lengths)} tokens, more than max_seq_len={max_seq_len}; "
            "set the dataset's max_seq_len (it truncates or splits) or raise max_seq_len"
        )
    if "document_ids" in batch[0]:
        if len(set(lengths)) != 1:
            raise ValueError(f"packed items must share one length, got {sorted(set(lengths))}")
        document_ids = torch.stack([item["document_ids"] for item in batch])
        return {
            "tokens": torch.stack([item["tokens"] for item in batch]),
            "labels": torch.stack([item["labels"] for item in batch]),
            "input_pos": torch.stack([item["input_pos"] for item in batch]),
            "mask": block_causal_mask(document_ids),
        }
    width = max(lengths)
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), ignore_index, dtype=torch.long)
    for row, item in enumerate(batch):
        n = item["tokens"].numel()
        tokens[row, :n] = item["tokens"]
        labels[row, :n] = item["labels"]
    return {"tokens": tokens, "labels": labels}
