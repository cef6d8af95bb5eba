"""torchrun's options as `qattune run` takes them: where they end and the recipe starts, and a check of
each (names, node counts, rendezvous backend, endpoint and timeout, node rank) before any process starts,
with the multi-node defaults (c10d for an endpoint). torchrun's own parser reads them."""

from __future__ import annotations

import os
import re
from argparse import ArgumentParser, Namespace
from pathlib import Path
from typing import NoReturn

from qattune.config.suggest import did_you_mean
from qattune.errors import QattuneError

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


def node_counts(nnodes: str) -> tuple[int, int]:
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


def rendezvous_timeout(args: Namespace) -> tuple[str, int]:
    """(--rdzv_conf key, seconds) of how long a launcher waits for the other nodes."""
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config

    key, default = ("timeout", 900) if args.rdzv_backend in ("static", "etcd") else ("join_timeout", 600)
    try:
        value = _parse_rendezvous_config(args.rdzv_conf).get(key, default)
        return key, int(value)
    except ValueError as err:
        raise QattuneError(f"--rdzv_conf {args.rdzv_conf}: {str(err).rstrip('.')}: write KEY=VALUE pairs separated "
                           "by commas") from None


def meeting_point(args: Namespace) -> str:
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


def _checkmeeting_point(args: Namespace, max_nodes: int, given: set[str]) -> None:
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
                           f"the node at {meeting_point(args)}); or give only --rdzv_endpoint HOST:PORT, which "
                           "numbers the nodes itself")


def launch_args(options: list[str], script: Path, recipe_args: list[str]) -> Namespace:
    """torchrun's arguments for running `script` with `options`, checked, with the multi-node defaults."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    names = _scan_options(options)[0]
    _check_option_names(names, parser)
    parser.error = _refuse_usage  # type: ignore[method-assign]
    args = parser.parse_args([*options, str(script), *recipe_args])
    given = _given(names, parser)
    _, max_nodes = node_counts(args.nnodes)
    if max_nodes > 1:
        _default_to_c10d(args, given)
    _check_nproc_per_node(args.nproc_per_node)
    _check_backend(args.rdzv_backend)
    if args.rdzv_endpoint:
        _check_endpoint(args.rdzv_endpoint)
    rendezvous_timeout(args)
    _check_node_rank(args, max_nodes, given)
    if max_nodes > 1:
        _checkmeeting_point(args, max_nodes, given)
    return args


def nodes(args: Namespace) -> str:
    low, high = node_counts(args.nnodes)
    return f"{high} nodes" if low == high else f"{low} to {high} nodes"


