"""Loss masking: turn token ids plus a "train on this token" mask into next-token labels."""

from __future__ import annotations

from typing import Sequence

IGNORE_INDEX = -100
"""Label value that the loss skips (PyTorch's cross-entropy default)."""


def next_token_labels(token_ids: Sequence[int], trained: Sequence[bool]) -> list[int]:
    """Labels aligned with `token_ids`: position i predicts token i+1.

    `labels[i] = token_ids[i + 1]` when `trained[i + 1]` is True, else `IGNORE_INDEX`; the last
    position has no next token and is always ignored. Labels are shifted here, inside one document,
    so a packed sequence never asks a document to predict the next document's first token and the
    training loop needs no shift of its own.
    """
    if len(token_ids) != len(trained):
        raise ValueError(f"token_ids ({len(token_ids)}) and trained mask ({len(trained)}) differ in length")
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(token_ids[1:], trained[1:])]
    labels.append(IGNORE_INDEX)
    return labels
