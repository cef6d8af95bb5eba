"""Sampling rules against distributions computed by hand in the test."""

import math
import re

import pytest
import torch

from qattune.errors import QattuneError
from qattune.generation import next_token_probs, sample_next_token, top_k_filter, top_p_filter
from qattune.generation.sampling import check_sampling_options


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_temperature_scales_logits_before_softmax():
    logits = [0.0, 1.0, -2.0, 0.5]
    probs = next_token_probs(torch.tensor([logits]), temperature=2.0)[0]
    expected = softmax([v / 2.0 for v in logits])
    assert probs.tolist() == pytest.approx(expected, abs=1e-7)


def test_top_k_keeps_the_k_largest_and_renormalises():
    logits = [1.0, 3.0, 2.0, 0.5, -1.0]
    probs = next_token_probs(torch.tensor([logits]), temperature=1.0, top_k=3)[0]
    kept = softmax([1.0, 3.0, 2.0])
    assert probs.tolist() == pytest.approx(kept + [0.0, 0.0], abs=1e-7)


def test_top_k_keeps_ties_at_the_boundary():
    filtered = top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 3.0]]), 1)[0]
    assert filtered.tolist() == [float("-inf"), 3.0, float("-inf"), 3.0]
    # k larger than the vocabulary keeps everything
    assert top_k_filter(torch.tensor([[1.0, 2.0]]), 10).tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("top_p, kept_ids", [(0.45, [3]), (0.55, [3, 0]), (0.8, [3, 0, 4]), (1.0, [3, 0, 4, 1, 2])])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept_ids):
    probs = [0.2, 0.1, 0.05, 0.5, 0.15]  # sorted: id3 .5, id0 .2, id4 .15, id1 .1, id2 .05
    out = top_p_filter(torch.tensor([probs], dtype=torch.float64), top_p)[0].tolist()
    mass = sum(probs[i] for i in kept_ids)
    expected = [probs[i] / mass if i in kept_ids else 0.0 for i in range(5)]
    assert out == pytest.approx(expected, abs=1e-12)


def test_top_p_always_keeps_the_most_likely_token():
    out = top_p_filter(torch.tensor([[0.1, 0.9]]), 0.01)[0]
    assert out.tolist() == [0.0, 1.0]


def test_top_k_then_top_p_on_the_renormalised_distribution():
    logits = [2.0, 1.0, 0.0, -1.0]
    probs = next_token_probs(torch.tensor([logits]), temperature=0.5, top_k=3, top_p=0.9)[0].tolist()
    after_k = softmax([2.0 / 0.5, 1.0 / 0.5, 0.0])  # ~[0.867, 0.117, 0.016]
    assert after_k[0] < 0.9 < after_k[0] + after_k[1]  # so top-p keeps ids 0 and 1
    mass = after_k[0] + after_k[1]
    assert probs == pytest.approx([after_k[0] / mass, after_k[1] / mass, 0.0, 0.0], abs=1e-6)


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [9.0, 0.0, 0.0, 0.0]])
    assert sample_next_token(logits, temperature=0.0).tolist() == [1, 0]


def test_sampling_draws_only_kept_tokens_with_the_filtered_frequencies():
    logits = torch.tensor([[0.0, math.log(3.0), math.log(1.0), -5.0]]).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, temperature=1.0, top_k=2, generator=generator)
    # the 2nd largest logit is 0, shared by ids 0 and 2: boundary ties are kept, so probs are [1, 3, 1, 0] / 5
    assert set(draws.tolist()) <= {0, 1, 2}
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts.tolist() == pytest.approx([0.2, 0.6, 0.2, 0.0], abs=0.03)
    again = sample_next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0, "top_k": None, "top_p": None}, "temperature=-1.0 is negative"),
    ({"temperature": 1.0, "top_k": 0, "top_p": None}, "top_k=0 must be at least 1"),
    ({"temperature": 1.0, "top_k": None, "top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
])
def test_bad_sampling_options_are_one_line_errors(kwargs, message):
    with pytest.raises(QattuneError, match=re.escape(message)):
        check_sampling_options(**kwargs)
