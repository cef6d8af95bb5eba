"""An optional torch.profiler around the training loop, writing Chrome/TensorBoard traces."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any

import torch


class NoProfiler(AbstractContextManager):
    """Stands in when profiling is off: `step()` does nothing."""

    def __exit__(self, *exc: Any) -> None:
        return None

    def step(self) -> None:
        pass


def setup_profiler(
    enabled: bool = False,
    output_dir: str = "profiler_traces",
    wait_steps: int = 1,
    warmup_steps: int = 1,
    active_steps: int = 2,
    record_shapes: bool = False,
    profile_memory: bool = False,
    with_stack: bool = False,
    with_flops: bool = False,
    num_cycles: int = 1,
    cpu: bool = True,
    cuda: bool = True,
) -> AbstractContextManager:
    """A context manager whose `step()` the trainer calls after each optimizer step.

    When enabled, profiles CPU (`cpu`) and CUDA when present (`cuda`) for `active_steps` steps after
    `wait_steps` + `warmup_steps`, `num_cycles` times, and writes one trace per rank under `output_dir`.
    The arguments are torchtune's `setup_torch_profiler` fields.
    """
    if not enabled:
        return NoProfiler()
    if profile_memory:  # the memory timeline needs them (torchtune turns them on too)
        with_stack = record_shapes = True
    os.makedirs(output_dir, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU] if cpu else []
    if cuda and torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=wait_steps, warmup=warmup_steps, active=active_steps, repeat=num_cycles),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(output_dir, worker_name=f"rank{rank}"),
        record_shapes=record_shapes,
        profile_memory=profile_memory,
        with_stack=with_stack,
        with_flops=with_flops,
    )
    profiler.steps_before_first_trace = wait_steps + warmup_steps + active_steps  # the session warns on shorter runs
    return profiler
