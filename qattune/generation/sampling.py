"""Next-token selection: greedy, temperature, top-k and top-p (nucleus), with exact definitions.

For one row of logits `z` (float32):
- temperature `T > 0`: `p = softmax(z / T)`; `T == 0` means greedy (`argmax z`, first index on ties).
- top-k: keep every token whose logit is >= the k-th largest logit (ties at the boundary are kept, so
  more than k tokens can survive); the rest get probability 0 and the kept ones are renormalised.
- top-p: sort the (already top-k filtered) probabilities in descending order (stable: lower id first on
  ties) and keep a token when the probability mass strictly before it is `< p`; i.e. the smallest prefix
  whose mass reaches `p`. The most likely token is always kept. Kept ones are renormalised.
The order is temperature, then top-k, then top-p, as in Hugging Face's and torchtune's samplers.
"""

from __future__ import annotations

from typing import Optional

import torch

from qattune.errors import QattuneError


def check_sampling_options(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """A one-line QattuneError for a negative temperature, top_k < 1 or top_p outside (0, 1]."""
    if temperature < 0:
        raise QattuneError(f"temperature={temperature} is negative; use 0 for greedy decoding or a value > 0")
    if top_k is not None and top_k < 1:
        raise QattuneError(f"top_k={top_k} must be at least 1 (or null to keep every token)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise QattuneError(f"top_p={top_p} must be in (0, 1] (or null to keep every token)")


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """`logits` [..., V] with every entry below the k-th largest set to -inf (boundary ties kept)."""
    k = min(top_k, logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` [..., V] restricted to the nucleus of mass `top_p` and renormalised (see module docs)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def next_token_probs(
    logits: torch.Tensor, temperature: float, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """The sampling distribution [..., V] for `logits` [..., V] and `temperature` > 0."""
    if temperature <= 0:
        raise ValueError("next_token_probs needs temperature > 0; temperature 0 is greedy (argmax)")
    scaled = logits.float() / temperature
    if top_k is not None:
        scaled = top_k_filter(scaled, top_k)
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return probs


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids [B] from the last-position `logits` [B, V]: argmax when `temperature == 0`."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
