"""A tqdm progress bar over optimizer steps showing loss and tokens/s (tqdm adds the ETA)."""

from __future__ import annotations

from tqdm.auto import tqdm


class ProgressBar:
    """Shown on the main rank only; `enabled=False` makes every call a no-op."""

    def __init__(self, total_steps: int, initial_step: int, enabled: bool) -> None:
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, disable=not enabled)

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
