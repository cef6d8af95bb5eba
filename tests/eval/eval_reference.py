"""Independent reference log-probabilities: one full forward per scored token, float64 log-softmax."""

import torch


def next_logprobs(model, context):
    """log p(· | context) from the model's last logits over `context` alone."""
    with torch.no_grad():
        logits = model(torch.tensor([list(context)]))[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


def token_logprob(model, context, target):
    return float(next_logprobs(model, context)[target])


def continuation_score(model, context, continuation):
    """(Σ log p(continuation[i] | context + continuation[:i]), whether each token was the argmax)."""
    ids, total, greedy = list(context), 0.0, True
    for token in continuation:
        logprobs = next_logprobs(model, ids)
        total += float(logprobs[token])
        greedy = greedy and int(torch.argmax(logprobs)) == token
        ids.append(token)
    return total, greedy


def continuation_logprob(model, context, continuation):
    return continuation_score(model, context, continuation)[0]
