"""`qattune run [torchrun options] RECIPE --config CONFIG [overrides]`.

Without torchrun options the recipe script runs in this process (`runpy`, as `__main__`). With them,
`torch.distributed.run` launches the same script on every process. Either way the script's own
`recipe_main` parses `--config` and the overrides, so both paths behave the same; with torchrun the
config and the torchrun options (`torchrun_options`) are also checked here first, so a mistake is one
line before any process starts. The workers' reports reach the user through the launcher
(`worker_reports`); rendezvous timeouts, a signal to the launcher and other launch failures are one line
each too.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import signal
import socket
import sys
import threading
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable, NoReturn

from qattune.cli.torchrun_options import launch_args, meeting_point, node_counts, nodes, rendezvous_timeout
from qattune.cli.torchrun_options import split_run_args
from qattune.cli.worker_reports import (report_failure, report_folder, report_interrupt, show,
                                        worker_lifecycle_logs_replaced)
from qattune.config.discovery import find_recipe_file
from qattune.errors import QattuneError, report_lines


def _first_line(err: BaseException) -> str:
    """The first line of what `err` says, from its cause when it only points there ("see inner exception")."""
    if err.__cause__ is not None and "inner exception" in str(err):
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def _launch_error(err: Exception, args: Namespace) -> QattuneError:
    """One line for a launch that failed before any worker ran."""
    from torch.distributed import DistError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError

    text = _first_line(err)
    if isinstance(err, RendezvousTimeoutError) or (isinstance(err, DistError) and "timed out" in text.lower()):
        key, seconds = rendezvous_timeout(args)
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        so_far = f" ({joined.group(1)} of {joined.group(2)} joined)" if joined else ""
        return QattuneError(f"timed out after {seconds} s waiting for {nodes(args)} at {meeting_point(args)}"
                            f"{so_far}: start the same command on every node, or wait longer with --rdzv_conf "
                            f"{key}=SECONDS")
    if isinstance(err, (RendezvousConnectionError, DistError)):
        return QattuneError(f"cannot reach the rendezvous at {meeting_point(args)}: {text}: check that HOST is one "
                            "of the nodes, reachable from this one, and start that node first")
    return QattuneError(f"torchrun could not launch the workers: {text}")


class _RendezvousWatch:
    """Ctrl-C or SIGTERM while this launcher waits for the other nodes. A static rendezvous waits in C++,
    where Python runs no signal handler until its timeout (15 minutes): a thread woken by the signal calls
    `on_signal(signum)` when the main thread has not handled it within a second, as long as no worker has
    started (torchrun installs its own handlers when they start, and handles signals from then on)."""

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self.handled = threading.Event()
        self._on_signal = on_signal

    def __enter__(self) -> "_RendezvousWatch":
        self._wake, self._signalled = socket.socketpair()
        self._signalled.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._signalled.fileno(), warn_on_full_buffer=False)
        self._launcher_handlers = self._handlers()
        threading.Thread(target=self._watch, name="qattune-rendezvous-watch", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.handled.set()
        signal.set_wakeup_fd(self._previous_fd)
        self._signalled.close()

    @staticmethod
    def _handlers() -> tuple[Any, Any]:
        return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def _watch(self) -> None:
        with self._wake:
            while (signum := self._wake.recv(1)) and not self.handled.wait(1.0):
                if self._handlers() == self._launcher_handlers:
                    self._on_signal(signum[0])


def _stop_waiting(signum: int, cfg: Any, folder: str) -> NoReturn:
    """The launcher's line for a signal while it waits for the other nodes, then exit at once (the main
    thread is stuck in the rendezvous; no worker has started)."""
    from qattune.config.recipe_main import interrupted_message

    show(report_lines(interrupted_message(cfg), kind="interrupted"))
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(128 + signum)


def _launch(args: Namespace, cfg: Any) -> None:
    """Run torchrun with `args`; every way it can fail ends in one line per distinct report."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    from qattune.config.recipe_main import sigterm_interrupts

    if node_counts(args.nnodes)[1] > 1:
        print(f"waiting for {nodes(args)} at {meeting_point(args)} (rendezvous timeout "
              f"{rendezvous_timeout(args)[1]} s)", file=sys.stderr, flush=True)
    with report_folder() as folder, worker_lifecycle_logs_replaced(), sigterm_interrupts(), \
            _RendezvousWatch(lambda signum: _stop_waiting(signum, cfg, folder)) as watch:
        try:
            run(args)
        except ChildFailedError as err:
            report_failure(err, folder)
        except (KeyboardInterrupt, SignalException) as stop:
            watch.handled.set()
            report_interrupt(stop, folder, cfg)
        except Exception as err:  # noqa: BLE001 - a launcher error is one line, not torchrun's traceback
            raise _launch_error(err, args) from None


def _torchrun(options: list[str], script: Path, recipe_args: list[str]) -> None:
    """Check the config (cheap, no torch) and the torchrun options, then launch the script on every process."""
    from qattune.config.recipe_main import load_and_validate, parse_recipe_args

    cfg = load_and_validate(*parse_recipe_args(recipe_args), script)
    _import_torch_quietly()
    _launch(launch_args(options, script, recipe_args), cfg)


def _import_torch_quietly() -> None:
    """Import torch with its C++ log off in this launcher (a rendezvous that waits for other nodes logs each
    retry with a C++ stack): its failures become one line each here. The workers keep the log."""
    if "torch" in sys.modules or "TORCH_CPP_LOG_LEVEL" in os.environ:
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        import torch  # noqa: F401
    finally:
        del os.environ["TORCH_CPP_LOG_LEVEL"]


def run_command(args: list[str]) -> None:
    """`qattune run ...`: the recipe's --help, torchrun, or the recipe script in this process."""
    from qattune.config.recipe_main import recipe_usage, wants_help
    from qattune.config.schema import parse_recipe

    torchrun_options, recipe, recipe_args = split_run_args(args)
    script = find_recipe_file(recipe)
    parse_recipe(script)  # a syntax error is one line, not a traceback from every process
    if wants_help(recipe_args):
        print(recipe_usage(script, recipe))
        return
    if torchrun_options:
        _torchrun(torchrun_options, script, recipe_args)
        return
    saved_argv = sys.argv
    sys.argv = [str(script), *recipe_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv
