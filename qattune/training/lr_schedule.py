"""Learning-rate schedules: linear warmup, then cosine or linear decay (LambdaLR, state saved with the run).

Warmup step s (from 0) runs at (s + 1) / (w + 1) of the rate, where torchtune's and Hugging Face's
schedules give s / w: their first step trains at rate 0. After warmup the two agree. The trainer logs
the rate a step used (torchtune logs the next step's, one step ahead).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, num_warmup_steps: int) -> float:
    return (step + 1) / (num_warmup_steps + 1)


def get_cosine_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """LR factor rises linearly for `num_warmup_steps` (never 0 at step 0), then follows a cosine
    from 1 down to `min_lr_ratio` over the remaining steps (`num_cycles=0.5`: one half wave)."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * min(progress, 1.0)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return LambdaLR(optimizer, factor)


def get_linear_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """LR factor rises linearly for `num_warmup_steps`, then falls linearly to `min_lr_ratio` at the last step."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * max(0.0, 1.0 - progress)

    return LambdaLR(optimizer, factor)
