"""Step hooks: called before every optimizer step with the global step about to run."""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from torch import nn

from qattune.errors import QattuneError


class StepHook(Protocol):
    """Anything with `on_step_start(step)`; `step` = optimizer steps already completed (0 first).

    A hook may also have `metrics() -> dict[str, float]`, merged into the step's logged metrics.
    """

    def on_step_start(self, step: int) -> None: ...


def fake_quant_enabled_at(step: int, after_n_steps: Optional[int]) -> bool:
    """DESIGN §3: fake quantization is off for optimizer steps < N and on from step N (None: always on)."""
    return after_n_steps is None or step >= after_n_steps


class FakeQuantAfterNSteps:
    """Sets the quantizer's fake-quant state from the global step, at every step.

    The state is derived, never remembered, so a run resumed from any checkpoint (before or after N)
    is in the right state; `set_fake_quant` is only called when the wanted state differs from the
    last one applied (the first call always applies). A quantizer without `set_fake_quant` (e.g.
    torchao's) is left as its `prepare` made it: fake-quantized from the start, the only schedule it
    can follow.
    """

    def __init__(self, quantizer: Any, model: nn.Module, after_n_steps: Optional[int]) -> None:
        if after_n_steps is not None and after_n_steps < 0:
            raise QattuneError(f"fake_quant_after_n_steps must be >= 0 or null, got {after_n_steps}")
        self.toggles = callable(getattr(quantizer, "set_fake_quant", None))
        if not self.toggles and after_n_steps:
            raise QattuneError(
                f"quantizer {type(quantizer).__name__} has no set_fake_quant(model, enabled), which "
                f"fake_quant_after_n_steps={after_n_steps} needs; use qattune.quant.QATQuantizer, or set "
                "fake_quant_after_n_steps=null (fake quantization from the start)"
            )
        self.quantizer = quantizer
        self.model = model
        self.after_n_steps = after_n_steps
        self.applied: Optional[bool] = None

    def on_step_start(self, step: int) -> None:
        wanted = fake_quant_enabled_at(step, self.after_n_steps)
        if self.toggles and wanted != self.applied:
            self.quantizer.set_fake_quant(self.model, wanted)
            self.applied = wanted

    def metrics(self) -> dict[str, float]:
        """`fake_quant_enabled`: 1.0 when every fake-quantized module of the model has it on, read from
        the modules themselves (not from this hook's memory)."""
        states = [m.fake_quant_enabled for m in self.model.modules() if hasattr(m, "fake_quant_enabled")]
        return {"fake_quant_enabled": float(all(states))} if states else {}


class RoundingAtStep:
    """Runs `initialize` (the quantizer's choice of starting roundings, e.g. AWQ scaling and GPTQ) once,
    before optimizer step `at_step`: the step fake quantization turns on after a float phase.

    Like `FakeQuantAfterNSteps` it follows the global step: a run resumed from a checkpoint taken at or
    before `at_step` rounds when it gets there, as the uninterrupted run did; one resumed later never
    sees `at_step`, and its checkpoint holds the rounded weights and their scales already.
    """

    def __init__(self, initialize: Callable[[], None], at_step: int) -> None:
        self.initialize = initialize
        self.at_step = at_step
        self.done = False

    def on_step_start(self, step: int) -> None:
        if step == self.at_step and not self.done:
            self.initialize()
            self.done = True
