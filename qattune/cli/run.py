"""`qattune run [torchrun options] RECIPE --config CONFIG [overrides]`.

Without torchrun options the recipe script runs in this process (`runpy`, as `__main__`). With them,
`torch.distributed.run` launches the same script on every process. Either way the script's own
`recipe_main` parses `--config` and the overrides, so both paths behave the same; with torchrun the
config and the torchrun options are also checked here first, so a mistake is one line before any
process starts.

Under torchrun, workers do not print their one-line reports (errors, interruptions): they leave them in a
folder this launcher names (`QATTUNE_REPORT_DIR`), and the launcher prints each distinct one once after
the workers stop, naming the ranks when not every failed rank gave it. Rendezvous timeouts, a signal to
the launcher and other launch failures are one line each too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import shutil
import signal
import socket
import sys
import tempfile
import threading
from argparse import ArgumentParser, Namespace
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from qattune.config.discovery import find_recipe_file
from qattune.config.suggest import did_you_mean
from qattune.errors import REPORT_DIR_ENV, QattuneError, report_lines

HELP_FLAGS = ("-h", "--help")
# torchrun options that take no value; every other option takes one (as `--opt v` or `--opt=v`).
_FLAGS = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path", "-m", "--module",
          "--virtual-local-rank", "--virtual_local_rank", *HELP_FLAGS}
# The rendezvous id every node of a multi-node run gets when none is given: the same command on every node
# must give the same id.
DEFAULT_RDZV_ID = "qattune"
_NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")


def _scan_options(args: list[str]) -> tuple[list[str], int | None]:
    """The names of the torchrun options that start `args`, and the index of the recipe after them (None:
    no recipe before --config or the end)."""
    names, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            return names, i
        name = arg.split("=", 1)[0]
        if name == "--config":
            break
        names.append(name)
        i += 1 if ("=" in arg or name in _FLAGS) else 2
    return names, None


def split_run_args(args: list[str]) -> tuple[list[str], str, list[str]]:
    """(torchrun options, recipe, recipe arguments) from what follows `qattune run`."""
    _, at = _scan_options(args)
    if at is None:
        raise QattuneError("missing recipe: write `qattune run [torchrun options] RECIPE --config CONFIG` (see `qattune ls`)")
    return args[:at], args[at], args[at + 1 :]


def asks_for_help(args: list[str]) -> bool:
    """Whether -h/--help comes among the torchrun options, before any recipe (`qattune run --nnodes 2 -h`)."""
    return any(name in HELP_FLAGS for name in _scan_options(args)[0])


# ----- torchrun options ---------------------------------------------------------------------------


def _check_option_names(names: list[str], parser: ArgumentParser) -> None:
    """Name an unknown torchrun option in one line instead of argparse's usage dump."""
    known = parser._option_string_actions
    for name in names:
        if name not in known:
            hint = did_you_mean(name, [k for k in known if k.startswith("--")])
            raise QattuneError(f"unknown torchrun option '{name}'.{hint} See `torchrun --help`")


def _refuse_usage(message: str) -> NoReturn:
    raise QattuneError(f"torchrun {message}. See `torchrun --help`")


def _given(names: list[str], parser: ArgumentParser) -> set[str]:
    """The torchrun settings given on the command line or through torchrun's PET_* environment variables."""
    from_args = {parser._option_string_actions[name].dest for name in names}
    return from_args | {a.dest for a in parser._actions if f"PET_{a.dest.upper()}" in os.environ}


def _node_counts(nnodes: str) -> tuple[int, int]:
    """(min, max) nodes from --nnodes N or MIN:MAX."""
    try:
        counts = [int(part) for part in nnodes.split(":")]
    except ValueError:
        counts = []
    if len(counts) not in (1, 2) or not 0 < counts[0] <= counts[-1]:
        raise QattuneError(f"--nnodes must be a number of nodes such as 2 (or MIN:MAX such as 1:4), got '{nnodes}'")
    return counts[0], counts[-1]


def _check_nproc_per_node(value: str) -> None:
    from torch.distributed.run import determine_local_world_size

    if value in _NPROC_WORDS:
        try:
            determine_local_world_size(value)
        except ValueError as err:
            raise QattuneError(f"--nproc_per_node {value}: {err}") from None
    elif not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise QattuneError(f"--nproc_per_node must be a number of processes per node, 1 or more (or "
                           f"{', '.join(_NPROC_WORDS)}), got '{value}'")


def _check_backend(backend: str) -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    known = sorted(getattr(rendezvous_handler_registry, "_registry", {}))
    if known and backend not in known:
        raise QattuneError(f"unknown --rdzv_backend '{backend}'.{did_you_mean(backend, known)} Use c10d (one of: "
                           f"{', '.join(known)})")


def _check_endpoint(endpoint: str) -> None:
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        parse_rendezvous_endpoint(endpoint, default_port=29400)
    except ValueError:
        raise QattuneError(f"--rdzv_endpoint must be HOST:PORT with PORT a number (e.g. node0:29500), got "
                           f"'{endpoint}'") from None


def _rendezvous_timeout(args: Namespace) -> tuple[str, int]:
    """(--rdzv_conf key, seconds) of how long a launcher waits for the other nodes."""
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config

    key, default = ("timeout", 900) if args.rdzv_backend in ("static", "etcd") else ("join_timeout", 600)
    try:
        value = _parse_rendezvous_config(args.rdzv_conf).get(key, default)
        return key, int(value)
    except ValueError as err:
        raise QattuneError(f"--rdzv_conf {args.rdzv_conf}: {str(err).rstrip('.')}: write KEY=VALUE pairs separated "
                           "by commas") from None


def _meeting_point(args: Namespace) -> str:
    """Where the nodes meet: the rendezvous endpoint, or the static backend's master address and port."""
    return args.rdzv_endpoint or f"{args.master_addr}:{args.master_port or 29500}"


def _default_to_c10d(args: Namespace, given: set[str]) -> None:
    """Several nodes and an endpoint but no backend: c10d (torchrun's static default would make every node
    node 0), with one rendezvous id for every node."""
    if args.rdzv_endpoint and "rdzv_backend" not in given and not args.standalone:
        args.rdzv_backend = "c10d"
        if "rdzv_id" not in given:
            args.rdzv_id = DEFAULT_RDZV_ID


def _check_node_rank(args: Namespace, max_nodes: int, given: set[str]) -> None:
    if "node_rank" in given and not 0 <= args.node_rank < max_nodes:
        raise QattuneError(f"--node_rank {args.node_rank} is out of range for --nnodes {args.nnodes}: number the "
                           f"nodes 0 to {max_nodes - 1}")


def _check_meeting_point(args: Namespace, max_nodes: int, given: set[str]) -> None:
    """Several nodes need one place to meet, given the same way on every node."""
    if args.standalone:
        raise QattuneError(f"--standalone runs on one node, not --nnodes {args.nnodes}: drop it and give every node "
                           "the same --rdzv_endpoint HOST:PORT")
    static = args.rdzv_backend == "static"
    if not args.rdzv_endpoint and not (static and "master_addr" in given):
        raise QattuneError(f"--nnodes {args.nnodes} runs on several nodes: give every node the same --rdzv_endpoint "
                           "HOST:PORT, HOST being one of them (e.g. --rdzv_endpoint node0:29500)")
    if static and "node_rank" not in given:
        raise QattuneError(f"the static rendezvous (--rdzv_backend static, or --master_addr) with --nnodes "
                           f"{args.nnodes} needs a different --node_rank on each node, 0 to {max_nodes - 1} (0 on "
                           f"the node at {_meeting_point(args)}); or give only --rdzv_endpoint HOST:PORT, which "
                           "numbers the nodes itself")


def _launch_args(options: list[str], script: Path, recipe_args: list[str]) -> Namespace:
    """torchrun's arguments for running `script` with `options`, checked, with the multi-node defaults."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    names = _scan_options(options)[0]
    _check_option_names(names, parser)
    parser.error = _refuse_usage  # type: ignore[method-assign]
    args = parser.parse_args([*options, str(script), *recipe_args])
    given = _given(names, parser)
    _, max_nodes = _node_counts(args.nnodes)
    if max_nodes > 1:
        _default_to_c10d(args, given)
    _check_nproc_per_node(args.nproc_per_node)
    _check_backend(args.rdzv_backend)
    if args.rdzv_endpoint:
        _check_endpoint(args.rdzv_endpoint)
    _rendezvous_timeout(args)
    _check_node_rank(args, max_nodes, given)
    if max_nodes > 1:
        _check_meeting_point(args, max_nodes, given)
    return args


def _nodes(args: Namespace) -> str:
    low, high = _node_counts(args.nnodes)
    return f"{high} nodes" if low == high else f"{low} to {high} nodes"


# ----- reports of the workers and of the launcher --------------------------------------------------


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


def _show(lines: list[str]) -> None:
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
        _show(report_lines(message, kind, who))


def _exit_code(code: int) -> int:
    """A worker's exit code as a shell gives it: 128 + N for a worker killed by signal N."""
    return 128 - code if code < 0 else code or 1


def _unreported(code: int) -> str:
    """What is known of a worker that failed without a report (a traceback, or killed)."""
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}{' (out of memory?)' if name == 'SIGKILL' else ''}"
    return f"exited with code {code} without a qattune report; its output above says why"


def _report_failure(err: Any, folder: str) -> NoReturn:
    """After a worker failed: every distinct report once, a line for each failed worker that left none, then exit
    with the first failure's code."""
    reports = _read_reports(folder)
    first_rank, first = err.get_first_failure()
    failed = {rank for rank, failure in err.failures.items() if failure.exitcode > 0} | {first_rank} | set(reports)
    _print_reports(reports, failed)
    for rank in sorted(failed - set(reports)):
        _show(report_lines(_unreported(err.failures[rank].exitcode), who=f" (rank {rank})"))
    sys.exit(_exit_code(first.exitcode))


def _report_interrupt(stop: BaseException, folder: str, cfg: Any) -> NoReturn:
    """After a signal to the launcher: the workers' reports, or the launcher's own line when there are none
    (it was still waiting for other nodes, or the workers died of the signal); exit 128 + the signal."""
    from qattune.config.recipe_main import interrupt_exit_code, interrupted_message

    reports = _read_reports(folder)
    if reports:
        _print_reports(reports, set(reports))
    else:
        _show(report_lines(interrupted_message(cfg), kind="interrupted"))
    sys.exit(interrupt_exit_code(stop))


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
        key, seconds = _rendezvous_timeout(args)
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        so_far = f" ({joined.group(1)} of {joined.group(2)} joined)" if joined else ""
        return QattuneError(f"timed out after {seconds} s waiting for {_nodes(args)} at {_meeting_point(args)}"
                            f"{so_far}: start the same command on every node, or wait longer with --rdzv_conf "
                            f"{key}=SECONDS")
    if isinstance(err, (RendezvousConnectionError, DistError)):
        return QattuneError(f"cannot reach the rendezvous at {_meeting_point(args)}: {text}: check that HOST is one "
                            "of the nodes, reachable from this one, and start that node first")
    return QattuneError(f"torchrun could not launch the workers: {text}")


class _WorkerLifecycleFilter(logging.Filter):
    """Drops torchrun's log lines about its workers failing or being signalled: the launcher's reports
    replace them."""

    _REPLACED = ("failed (exitcode", "Sending process", "Received %s death signal")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._REPLACED)


@contextmanager
def _worker_lifecycle_logs_replaced() -> Iterator[None]:
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
def _report_folder() -> Iterator[str]:
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

    _show(report_lines(interrupted_message(cfg), kind="interrupted"))
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(128 + signum)


def _launch(args: Namespace, cfg: Any) -> None:
    """Run torchrun with `args`; every way it can fail ends in one line per distinct report."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    from qattune.config.recipe_main import sigterm_interrupts

    if _node_counts(args.nnodes)[1] > 1:
        print(f"waiting for {_nodes(args)} at {_meeting_point(args)} (rendezvous timeout "
              f"{_rendezvous_timeout(args)[1]} s)", file=sys.stderr, flush=True)
    with _report_folder() as folder, _worker_lifecycle_logs_replaced(), sigterm_interrupts(), \
            _RendezvousWatch(lambda signum: _stop_waiting(signum, cfg, folder)) as watch:
        try:
            run(args)
        except ChildFailedError as err:
            _report_failure(err, folder)
        except (KeyboardInterrupt, SignalException) as stop:
            watch.handled.set()
            _report_interrupt(stop, folder, cfg)
        except Exception as err:  # noqa: BLE001 - a launcher error is one line, not torchrun's traceback
            raise _launch_error(err, args) from None


def _torchrun(options: list[str], script: Path, recipe_args: list[str]) -> None:
    """Check the config (cheap, no torch) and the torchrun options, then launch the script on every process."""
    from qattune.config.recipe_main import load_and_validate, parse_recipe_args

    cfg = load_and_validate(*parse_recipe_args(recipe_args), script)
    _import_torch_quietly()
    _launch(_launch_args(options, script, recipe_args), cfg)


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
