"""Metric loggers selectable by `_component_`: stdout, a JSONL file, TensorBoard (when installed).

The trainer calls `start(step)` on rank 0 before the first step it logs (0 for a fresh run, the resumed
step otherwise), `log(metrics, step)` after logged steps, and the session `close()` at the end. A
resumed run's log continues the series: what the interrupted run logged after the checkpoint (the steps
the resumed run repeats) is dropped (JSONL) or hidden (TensorBoard's purge step), and a fresh run does
not mix its steps with an earlier run's in the same `output_dir`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Mapping, Optional

from qattune.errors import QattuneError

log = logging.getLogger(__name__)


def _format(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class StdoutLogger:
    """Prints `step N | key=value ...` lines (through tqdm, so a progress bar on the terminal moves below
    them instead of sharing their line)."""

    def start(self, step: int) -> None:
        pass

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from tqdm import tqdm

        tqdm.write(f"step {step} | " + " ".join(f"{k}={_format(v)}" for k, v in metrics.items()), file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        pass


class JSONLLogger:
    """Appends one JSON object per log call, `{"step": N, "time": unix_seconds, ...metrics}`, to
    `log_dir/filename`; each line is flushed so a crashed run keeps what it logged. On `start`, a
    resumed run drops the rows after its step; a fresh run moves an earlier run's file aside
    (`metrics.1.jsonl`, ...). The file is opened at the first `start` or `log`."""

    def __init__(self, log_dir: str, filename: Optional[str] = "metrics.jsonl") -> None:
        self.path = os.path.join(log_dir, filename or "metrics.jsonl")  # torchtune's DiskLogger: null = default
        self._file = None

    def start(self, step: int) -> None:
        if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
            if step == 0:
                aside = self._free_name()
                os.replace(self.path, aside)
                log.warning("%s holds an earlier run's metrics: moved to %s", self.path, aside)
            else:
                self._keep_rows_up_to(step)
        self._open()

    def _free_name(self) -> str:
        stem, suffix = os.path.splitext(self.path)
        number = 1
        while os.path.exists(f"{stem}.{number}{suffix}"):
            number += 1
        return f"{stem}.{number}{suffix}"

    def _keep_rows_up_to(self, step: int) -> None:
        with open(self.path, encoding="utf-8") as file:
            lines = file.readlines()
        kept = [line for line in lines if _row_step(line) <= step]
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            file.writelines(kept)
        os.replace(temporary, self.path)

    def _open(self) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._open()
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _row_step(line: str) -> float:
    """A JSONL row's step; a damaged row (a crash mid-write) counts as past any step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class TensorBoardLogger:
    """Writes scalars with `torch.utils.tensorboard.SummaryWriter` into `log_dir` (with `organize_logs`,
    torchtune's option, into a `run_<unix time>` folder of it per run). On `start`, events from the step
    after it on (an interrupted run's repeated steps, or an earlier run's) are hidden, by the writer's
    purge step."""

    def __init__(self, log_dir: str, organize_logs: bool = False) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise QattuneError(
                "metric_logger TensorBoardLogger needs the tensorboard package, which is not installed; "
                "run `pip install tensorboard` or use qattune.training.JSONLLogger"
            ) from err
        self._writer_class = SummaryWriter
        self.log_dir = os.path.join(log_dir, f"run_{int(time.time())}") if organize_logs else log_dir
        self._writer = None

    def start(self, step: int) -> None:
        self.close()
        self._writer = self._writer_class(log_dir=self.log_dir, purge_step=step + 1)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=self.log_dir)
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
