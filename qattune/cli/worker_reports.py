"""What the workers of a torchrun launch report, and how the launcher shows it: each worker leaves its
one-line report (error, interruption) in a folder the launcher names (`QATTUNE_REPORT_DIR`); after they
stop, the launcher prints each distinct report once, naming the ranks when not every failed rank gave it,
and a line for a worker that failed without one. torchrun's own lines about failed workers are dropped."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn

from qattune.errors import REPORT_DIR_ENV, report_lines

def _read_reports(folder: str) -> dict[int, tuple[str, str]]:
    """{rank: (kind, message)} of the reports workers left in `folder`."""
    reports = {}
    for path in Path(folder).glob("rank*.json"):
        try:
            found = json.loads(path.read_text())
            reports[int(found["rank"])] = (found["kind"], found["message"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return reports


def show(lines: list[str]) -> None:
    print("\n".join(lines), file=sys.stderr, flush=True)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _print_reports(reports: dict[int, tuple[str, str]], failed: set[int]) -> None:
    """Each distinct report once: as is when every failed rank gave it, else naming the ranks that did."""
    by_report: dict[tuple[str, str], list[int]] = {}
    for rank in sorted(reports):
        by_report.setdefault(reports[rank], []).append(rank)
    for (kind, message), ranks in by_report.items():
        who = "" if failed <= set(ranks) else f" ({_ranks(ranks)})"
        show(report_lines(message, kind, who))


def _exit_code(code: int) -> int:
    """A worker's exit code as a shell gives it: 128 + N for a worker killed by signal N."""
    return 128 - code if code < 0 else code or 1


def _unreported(code: int) -> str:
    """What is known of a worker that failed without a report (a traceback, or killed)."""
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}{' (out of memory?)' if name == 'SIGKILL' else ''}"
    return f"exited with code {code} without a qattune report; its output above says why"


def report_failure(err: Any, folder: str) -> NoReturn:
    """After a worker failed: every distinct report once, a line for each failed worker that left none, then exit
    with the first failure's code."""
    reports = _read_reports(folder)
    first_rank, first = err.get_first_failure()
    failed = {rank for rank, failure in err.failures.items() if failure.exitcode > 0} | {first_rank} | set(reports)
    _print_reports(reports, failed)
    for rank in sorted(failed - set(reports)):
        show(report_lines(_unreported(err.failures[rank].exitcode), who=f" (rank {rank})"))
    sys.exit(_exit_code(first.exitcode))


def report_interrupt(stop: BaseException, folder: str, cfg: Any) -> NoReturn:
    """After a signal to the launcher: the workers' reports, or the launcher's own line when there are none
    (it was still waiting for other nodes, or the workers died of the signal); exit 128 + the signal."""
    from qattune.config.recipe_main import interrupt_exit_code, interrupted_message

    reports = _read_reports(folder)
    if reports:
        _print_reports(reports, set(reports))
    else:
        show(report_lines(interrupted_message(cfg), kind="interrupted"))
    sys.exit(interrupt_exit_code(stop))


class _WorkerLifecycleFilter(logging.Filter):
    """Drops torchrun's log lines about its workers failing or being signalled: the launcher's reports
    replace them."""

    _REPLACED = ("failed (exitcode", "Sending process", "Received %s death signal")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._REPLACED)


@contextmanager
def worker_lifecycle_logs_replaced() -> Iterator[None]:
    names = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")
    quiet = _WorkerLifecycleFilter()
    for name in names:
        logging.getLogger(name).addFilter(quiet)
    try:
        yield
    finally:
        for name in names:
            logging.getLogger(name).removeFilter(quiet)


@contextmanager
def report_folder() -> Iterator[str]:
    """A folder for the workers' reports, named to them through REPORT_DIR_ENV."""
    previous = os.environ.get(REPORT_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="qattune-reports-") as folder:
        os.environ[REPORT_DIR_ENV] = folder
        try:
            yield folder
        finally:
            if previous is None:
                os.environ.pop(REPORT_DIR_ENV, None)
            else:
                os.environ[REPORT_DIR_ENV] = previous


