"""Metric loggers selectable by `_component_`: stdout, a JSONL file, TensorBoard (when installed)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Optional

from qattune.errors import QattuneError


def _format(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class StdoutLogger:
    """Prints `step N | key=value ...` lines."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        print(f"step {step} | " + " ".join(f"{k}={_format(v)}" for k, v in metrics.items()), file=sys.stdout, flush=True)

    def close(self) -> None:
        pass


class JSONLLogger:
    """Appends one JSON object per log call, `{"step": N, "time": unix_seconds, ...metrics}`, to
    `log_dir/filename`; each line is flushed so a crashed run keeps what it logged."""

    def __init__(self, log_dir: str, filename: Optional[str] = "metrics.jsonl") -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, filename or "metrics.jsonl")  # torchtune's DiskLogger: null = default
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    """Writes scalars with `torch.utils.tensorboard.SummaryWriter` into `log_dir`."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise QattuneError(
                "metric_logger TensorBoardLogger needs the tensorboard package, which is not installed; "
                "run `pip install tensorboard` or use qattune.training.JSONLLogger"
            ) from err
        self._writer = SummaryWriter(log_dir=log_dir)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
