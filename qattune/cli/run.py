"""`qattune run [torchrun options] RECIPE --config CONFIG [overrides]`.

Without torchrun options the recipe script runs in this process (`runpy`, as `__main__`). With them,
`torch.distributed.run` launches the same script on every process. Either way the script's own
`recipe_main` parses `--config` and the overrides, so both paths behave the same.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from qattune.config.discovery import find_recipe
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


def recipe_path(recipe: str) -> Path:
    """A shipped recipe's script, or a user's .py recipe file."""
    if recipe.endswith(".py"):
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise QattuneError(f"recipe file not found: {recipe}")
        return path
    return find_recipe(recipe).path


def _check_torchrun_options(options: list[str]) -> None:
    """Name an unknown torchrun option in one line instead of argparse's usage dump."""
    from torch.distributed.run import get_args_parser

    known = set(get_args_parser()._option_string_actions)
    for option in options:
        name = option.split("=", 1)[0]
        if name.startswith("-") and name not in known:
            hint = did_you_mean(name, [k for k in known if k.startswith("--")])
            raise QattuneError(f"unknown torchrun option '{name}'.{hint} See `torchrun --help`")


def run_command(args: list[str]) -> None:
    torchrun_options, recipe, recipe_args = split_run_args(args)
    script = recipe_path(recipe)
    if torchrun_options:
        _check_torchrun_options(torchrun_options)
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun_main

        try:
            torchrun_main([*torchrun_options, str(script), *recipe_args])
        except ChildFailedError as err:  # the failing process has printed its own error already
            codes = [f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 0]
            sys.exit(codes[0] if codes else 1)
        return
    saved_argv = sys.argv
    sys.argv = [str(script), *recipe_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv
