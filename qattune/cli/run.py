"""`qattune run [torchrun options] RECIPE --config CONFIG [overrides]`.

Without torchrun options the recipe script runs in this process (`runpy`, as `__main__`). With them,
`torch.distributed.run` launches the same script on every process. Either way the script's own
`recipe_main` parses `--config` and the overrides, so both paths behave the same; with torchrun the
config is also validated here first (no torch import), so a mistake is one line before any process starts.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from qattune.config.discovery import find_recipe_file
from qattune.config.suggest import did_you_mean
from qattune.errors import QattuneError

# torchrun options that take no value; every other option takes one (as `--opt v` or `--opt=v`).
_FLAGS = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path", "-m", "--module",
          "--virtual-local-rank", "--virtual_local_rank"}


def split_run_args(args: list[str]) -> tuple[list[str], str, list[str]]:
    """(torchrun options, recipe, recipe arguments) from what follows `qattune run`."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            return args[:i], arg, args[i + 1 :]
        if arg == "--config" or arg.startswith("--config="):
            break
        i += 1 if ("=" in arg or arg in _FLAGS) else 2
    raise QattuneError("missing recipe: write `qattune run [torchrun options] RECIPE --config CONFIG` (see `qattune ls`)")


def _check_torchrun_options(options: list[str]) -> None:
    """Name an unknown torchrun option in one line instead of argparse's usage dump."""
    from torch.distributed.run import get_args_parser

    known = set(get_args_parser()._option_string_actions)
    for option in options:
        name = option.split("=", 1)[0]
        if name.startswith("-") and name not in known:
            hint = did_you_mean(name, [k for k in known if k.startswith("--")])
            raise QattuneError(f"unknown torchrun option '{name}'.{hint} See `torchrun --help`")


def _torchrun(options: list[str], script: Path, recipe_args: list[str]) -> None:
    """Validate the config here (cheap, no torch), then launch the script on every process."""
    from qattune.config.recipe_main import load_and_validate, parse_recipe_args

    load_and_validate(*parse_recipe_args(recipe_args), script)
    _check_torchrun_options(options)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main([*options, str(script), *recipe_args])
    except ChildFailedError as err:  # the failing process has printed its own error already
        codes = [f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 0]
        sys.exit(codes[0] if codes else 1)


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
