"""Log-probabilities of token continuations, batched: the one computation behind perplexity and lm-eval.

A scoring window is `(context, continuation)`, two lists of token ids with `context` non-empty. The model
reads `(context + continuation)[:-1]`; the logits at its last `len(continuation)` positions are scored
against `continuation`. The result per window is the summed natural-log probability of the continuation
and whether every continuation token was the argmax (greedy) prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qattune.errors import QattuneError
from qattune.generation.decode import model_dtype_and_device

Window = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class WindowScore:
    """Summed log-probability (nats) of a window's continuation and whether greedy decoding gives it."""

    logprob: float
    is_greedy: bool


def _check_window(index: int, window: Window) -> None:
    context, continuation = window
    if not context:
        raise QattuneError(f"scoring window {index} has an empty context; start it with a prefix token (bos/eos)")
    if not continuation:
        raise QattuneError(f"scoring window {index} has an empty continuation; there is nothing to score")


def _batches(order: list[int], lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Consecutive groups of `order` (longest first) with at most `batch_size` rows and, beyond one row,
    at most `max_batch_tokens` padded tokens (the logits of a batch are rows x width x vocab)."""
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        if current is not None and len(current) < batch_size and \
                (len(current) + 1) * lengths[current[0]] <= max_batch_tokens:
            current.append(index)
        else:
            batches.append([index])
    return batches


@torch.no_grad()
def score_windows(model: nn.Module, windows: Sequence[Window], batch_size: int = 8,
                  max_batch_tokens: int = 4096) -> list[WindowScore]:
    """Score every window (see module docs) in batches of up to `batch_size` rows and `max_batch_tokens`
    padded tokens, longest first.

    Rows of a batch are padded on the right; causal attention keeps padding out of every scored position.
    Log-softmax is taken in float32.
    """
    if batch_size < 1 or max_batch_tokens < 1:
        raise QattuneError(f"batch_size={batch_size} and max_batch_tokens={max_batch_tokens} must be at least 1")
    if getattr(model, "caches_are_enabled", lambda: False)():
        raise QattuneError("the model has KV caches set up; remove them (model.remove_caches()) before scoring")
    for index, window in enumerate(windows):
        _check_window(index, window)
    _, device = model_dtype_and_device(model)
    inputs = [list(ctx) + list(cont[:-1]) for ctx, cont in windows]
    order = sorted(range(len(windows)), key=lambda i: -len(inputs[i]))
    scores: list[WindowScore] = [WindowScore(0.0, True)] * len(windows)
    for chunk in _batches(order, [len(x) for x in inputs], batch_size, max_batch_tokens):
        width = len(inputs[chunk[0]])
        batch = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            batch[row, : len(inputs[index])] = torch.tensor(inputs[index])
        logits = model(batch.to(device))
        for row, index in enumerate(chunk):
            continuation = torch.tensor(list(windows[index][1]), device=device)
            end = len(inputs[index])
            row_logits = logits[row, end - len(continuation) : end].float()
            logprobs = F.log_softmax(row_logits, dim=-1)
            token_logprobs = logprobs.gather(-1, continuation.unsqueeze(-1)).squeeze(-1)
            greedy = bool(torch.equal(row_logits.argmax(dim=-1), continuation))
            scores[index] = WindowScore(float(token_logprobs.double().sum()), greedy)
    return scores
