"""Independent reference log-probabilities: one full forward per scored token, float64 log-softmax."""

import torch


def token_logprob(model, context, target):
    """log p(target | context) from the model's last logits over `context` alone."""
    with torch.no_grad():
        logits = model(torch.tensor([list(context)]))[0, -1].double()
    return float(torch.log_softmax(logits, dim=-1)[target])


def continuation_logprob(model, context, continuation):
    """Σ log p(continuation[i] | context + continuation[:i]), each from its own forward pass."""
    ids = list(context)
    total = 0.0
    for token in continuation:
        total += token_logprob(model, ids, token)
        ids.append(token)
    return total
