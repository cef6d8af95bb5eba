"""Perplexity and bits per byte against a hand computation on a tiny model."""

import json
import math

import pytest

from eval_reference import token_logprob
from gen_tiny import ByteChatTokenizer, tiny_model
from qattune.errors import QattuneError
from qattune.eval import load_texts, perplexity, perplexity_windows

TEXTS = ["def f(x):\n    return x * 2\n", "héllo wörld", "", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


def test_windows_of_disjoint_chunks():
    assert perplexity_windows([11, 12, 13, 14, 15], prefix_token=1, max_seq_len=2) == [
        ([1], [11, 12]), ([12], [13, 14]), ([14], [15])]


def test_windows_of_a_sliding_window_score_each_token_once():
    windows = perplexity_windows(list(range(11, 21)), prefix_token=1, max_seq_len=4, stride=2)
    assert windows == [([1], [11, 12, 13, 14]), ([12, 13, 14], [15, 16]), ([14, 15, 16], [17, 18]),
                       ([16, 17, 18], [19, 20])]
    for context, continuation in windows:
        assert len(context) + len(continuation) - 1 <= 4  # model input never exceeds max_seq_len


def test_bad_stride_is_an_error():
    with pytest.raises(QattuneError, match="1 <= stride <= max_seq_len"):
        perplexity_windows([1, 2, 3], 0, max_seq_len=2, stride=3)


def hand_nll(model, tokenizer, texts, max_seq_len, stride):
    """Target t_j (j >= 1 in prefix + tokens) is read with the context that starts where the definition
    says: at 0 in the first window, else at the begin b of the first window whose end reaches j."""
    nll, tokens, size = 0.0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text, add_bos=False, add_eos=False)
        if not ids:
            continue
        seq = [tokenizer.bos_id, *ids]
        tokens, size = tokens + len(ids), size + len(text.encode("utf-8"))
        for j in range(1, len(seq)):
            begin = 0
            while min(begin + max_seq_len, len(seq) - 1) < j:
                begin += stride
            nll -= token_logprob(model, seq[begin:j], seq[j])
    return nll, tokens, size


@pytest.mark.parametrize("max_seq_len, stride", [(256, None), (8, 8), (8, 3)])
def test_perplexity_equals_exp_mean_nll_by_hand(model, max_seq_len, stride):
    tokenizer = ByteChatTokenizer()
    result = perplexity(model, tokenizer, TEXTS, max_seq_len=max_seq_len, stride=stride, batch_size=3)
    nll, tokens, size = hand_nll(model, tokenizer, TEXTS, max_seq_len, stride or max_seq_len)
    assert (result.documents, result.tokens, result.bytes) == (3, tokens, size)
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll / size / math.log(2), rel=1e-5)
    assert result.to_dict()["byte_perplexity"] == pytest.approx(2 ** (nll / size / math.log(2)), rel=1e-5)


@pytest.mark.parametrize("max_seq_len, stride", [(256, None), (8, 3)])
def test_each_document_scores_as_if_evaluated_alone(model, max_seq_len, stride):
    tokenizer = ByteChatTokenizer()
    result = perplexity(model, tokenizer, TEXTS, max_seq_len=max_seq_len, stride=stride, batch_size=3)
    assert [d.index for d in result.per_document] == [0, 1, 3]  # the empty text is skipped, not renumbered
    for document in result.per_document:
        nll, tokens, size = hand_nll(model, tokenizer, [TEXTS[document.index]], max_seq_len, stride or max_seq_len)
        assert (document.tokens, document.bytes) == (tokens, size)
        assert document.nll == pytest.approx(nll, rel=1e-5)
        assert document.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert sum(d.nll for d in result.per_document) == pytest.approx(result.nll, rel=1e-12)
    assert result.to_dict()["per_document"][2] == {
        "index": 3, "tokens": result.per_document[2].tokens, "bytes": len(TEXTS[3]),
        "nll": result.per_document[2].nll, "perplexity": result.per_document[2].perplexity}


def test_batches_under_a_token_budget_give_the_same_result(model):
    tokenizer = ByteChatTokenizer()
    calls = []
    handle = model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        wide = perplexity(model, tokenizer, TEXTS, max_seq_len=8, batch_size=16)
        narrow = perplexity(model, tokenizer, TEXTS, max_seq_len=8, batch_size=16, max_batch_tokens=9)
    finally:
        handle.remove()
    windows = sum(len(perplexity_windows(tokenizer.encode(t, False, False), 1, 8)) for t in TEXTS if t)
    assert calls[0] == (windows, 8)  # one batch of all windows, then batches of at most 9 padded tokens
    assert len(calls) - 1 >= windows // 2 and all(rows == 1 or rows * width <= 9 for rows, width in calls[1:])
    assert narrow.nll == pytest.approx(wide.nll, rel=1e-6)
    assert (narrow.max_seq_len, narrow.stride) == (8, 8)


def test_context_matters_so_the_window_rule_is_checked(model):
    tokenizer = ByteChatTokenizer()
    short = perplexity(model, tokenizer, TEXTS, max_seq_len=4).nll
    full = perplexity(model, tokenizer, TEXTS, max_seq_len=256).nll
    assert abs(short - full) > 1e-3


def test_windows_longer_than_the_model_are_refused_in_one_line(model):
    tokenizer = ByteChatTokenizer()  # the model's max_seq_len is 256
    assert perplexity(model, tokenizer, TEXTS[:1], max_seq_len=256).tokens > 0
    with pytest.raises(QattuneError, match=r"^perplexity windows of max_seq_len=257 tokens are longer than the "
                                           r"model's max_seq_len=256: set perplexity.max_seq_len to at most 256"):
        perplexity(model, tokenizer, TEXTS[:1], max_seq_len=257)


def test_prefix_is_eos_without_bos(model):
    tokenizer = ByteChatTokenizer(with_bos=False)
    result = perplexity(model, tokenizer, ["abc"], max_seq_len=16)
    seq = [tokenizer.eos_id, *tokenizer.encode("abc", add_bos=False, add_eos=False)]
    expected = -sum(token_logprob(model, seq[:j], seq[j]) for j in range(1, len(seq)))
    assert result.nll == pytest.approx(expected, rel=1e-5)


def test_special_token_strings_in_the_text_are_those_tokens(model):
    """A chat-formatted document is scored on the ids HF tokenizers and the lm-eval adapter give it."""
    tokenizer = ByteChatTokenizer()
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = tokenizer.encode(text, add_bos=False, add_eos=False, allowed_special="all")
    assert ids[0] == tokenizer.special_tokens["<|im_start|>"] and len(ids) == len("user\nhi") + 2
    result = perplexity(model, tokenizer, [text], max_seq_len=16)
    seq = [tokenizer.bos_id, *ids]
    assert result.tokens == len(ids)
    assert result.nll == pytest.approx(-sum(token_logprob(model, seq[:j], seq[j]) for j in range(1, len(seq))), rel=1e-5)


def test_load_texts(tmp_path):
    docs = load_texts("python_docs", "validation", max_documents=2)
    assert len(docs) == 2 and all(isinstance(d, str) and d for d in docs)
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert load_texts(str(tmp_path / "a.jsonl"), column="body") == ["one", "two"]
    (tmp_path / "b.txt").write_text("whole file")
    assert load_texts(str(tmp_path / "b.txt")) == ["whole file"]
    with pytest.raises(QattuneError, match="row 0 has no 'text' field"):
        load_texts(str(tmp_path / "a.jsonl"))
    with pytest.raises(QattuneError, match="neither 'python_docs' nor an existing file"):
        load_texts(str(tmp_path / "missing.jsonl"))
