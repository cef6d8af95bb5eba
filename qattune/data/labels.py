"""Loss masking: turn token ids plus a "train on this token" mask into next-token labels."""

from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE_INDEX = -100
"""Label value that the loss skips (PyTorch's cross-entropy default)."""


def next_token_labels(token_ids: Sequence[int], trained: Sequence[bool]) -> np.ndarray:
    """Labels (int64 array) aligned with `token_ids`: position i predicts token i+1.

    `labels[i] = token_ids[i + 1]` when `trained[i + 1]` is True, else `IGNORE_INDEX`; the last
    position has no next token and is always ignored. Labels are shifted here, inside one document,
    so a packed sequence never asks a document to predict the next document's first token and the
    training loop needs no shift of its own.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    keep = np.asarray(trained, dtype=bool)
    if ids.shape != keep.shape:
        raise ValueError(f"token_ids ({ids.size}) and trained mask ({keep.size}) differ in length")
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(keep[1:], ids[1:], IGNORE_INDEX)
    return labels
