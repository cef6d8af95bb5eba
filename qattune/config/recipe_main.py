"""The entry point every recipe script shares: `python recipe.py --config NAME [overrides]`.

`qattune run` executes recipe scripts through this same path, in-process or under torchrun, so a
recipe behaves identically however it is launched: parse arguments, load and compose the config,
apply overrides, validate everything against the recipe's `Config` schema, then call the recipe.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from omegaconf import DictConfig

from qattune.config.discovery import find_config, find_recipe_file, list_configs
from qattune.config.loader import compose, header_recipe
from qattune.config.overrides import override_problems
from qattune.config.schema import RecipeSchema, SchemaField, parse_recipe, read_schema
from qattune.config.validate import validate_config
from qattune.errors import QattuneError, report, report_and_exit

HELP_FLAGS = ("-h", "--help")


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def parse_recipe_args(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(`--config` value, overrides) from a recipe's command line."""
    config, overrides, args = None, [], list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise QattuneError("--config needs a value: a shipped config name or a path to a YAML file")
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            raise QattuneError(f"unknown option '{arg}': a recipe takes --config NAME and key=value overrides "
                               "(--help lists its keys)")
        else:
            overrides.append(arg)
    if not config:
        raise QattuneError("missing --config: name a shipped config (see `qattune ls`) or a YAML file")
    return config, overrides


def config_recipe_file(config: str, recipe: str | None = None) -> Path | None:
    """The recipe script to check `config` against: `recipe` (a name or .py path) when given, else the one
    its `# recipe:` header names (inherited through `defaults:`); None when no recipe is known."""
    if recipe:
        return find_recipe_file(recipe)
    found = header_recipe(find_config(config))
    if found is None:
        return None
    name, named_in = found
    try:
        return find_recipe_file(name, base=named_in.parent)
    except QattuneError as err:
        raise QattuneError(f"{named_in}: its '# recipe: {name}' header names no recipe: {err}") from None


def _against(schema: RecipeSchema | None, recipe_file: Path | None) -> str:
    """How a report names what the config was checked against."""
    if schema is not None:
        return f" for recipe '{schema.recipe}'"
    if recipe_file is None:
        return " (no recipe is known, so its keys were not checked: pass --recipe NAME)"
    return f" (recipe '{recipe_file.stem}' declares no Config, so its keys were not checked)"


def load_and_validate(config: str, overrides: Sequence[str], recipe_file: str | Path | None) -> DictConfig:
    """The composed config with overrides, raising one QattuneError that lists every problem found
    (bad overrides and the problems of the config they leave, together)."""
    recipe_file = Path(recipe_file) if recipe_file else None
    schema = read_schema(recipe_file) if recipe_file else None
    cfg = compose(find_config(config))
    problems = override_problems(cfg, list(overrides), schema.fields if schema else None)
    problems += [str(p) for p in validate_config(cfg, schema)]
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise QattuneError("\n".join([f"{count} in config '{config}'{_against(schema, recipe_file)}:", *problems]))
    if schema is not None:
        for name, field in schema.fields.items():
            if not field.required and name not in cfg:
                cfg[name] = field.default  # the recipe's default, so recipes read cfg.key directly
    return cfg


def _describe_field(field: SchemaField) -> str:
    if field.refused is not None:
        accepted = field.refused.accept or (field.default,)
        return f"must be {' or '.join(json.dumps(a) for a in accepted)} ({field.refused.why})"
    kind = field.spec.describe().replace(" (a mapping with _component_)", "")
    if field.provided:
        kind += f" (the recipe passes {', '.join(field.provided)})"
    return kind if field.required else f"{kind}; default {json.dumps(field.default)}"


def recipe_usage(recipe_file: Path, name: str | None = None) -> str:
    """`--help` for a recipe: how to run it, what it does, its shipped configs and the keys it reads."""
    doc = (ast.get_docstring(parse_recipe(recipe_file)) or "").split("\n\n")[0]
    name = name or recipe_file.stem
    lines = [f"usage: qattune run [torchrun options] {name} --config CONFIG [overrides ...]", "", doc, ""]
    configs = [c.name for c in list_configs() if c.recipe == recipe_file.stem]
    if configs and not name.endswith(".py"):
        lines += [f"shipped configs: {', '.join(configs)}", ""]
    schema = read_schema(recipe_file)
    if schema is None:
        return "\n".join([*lines, "This recipe declares no Config class, so the keys it reads are not known."])
    width = max(len(key) for key in schema.fields) + 3
    lines.append("keys it reads (* required; set one with key=value, see `qattune cat CONFIG` for a config's values):")
    for key, field in schema.fields.items():
        lines.append(f"  {key + ('*' if field.required else ''):<{width}}{_describe_field(field)}")
    return "\n".join(lines)


class Interrupted(KeyboardInterrupt):
    """A termination request (SIGTERM: `kill`, SLURM preemption) handled as Ctrl-C is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_exit_code(stop: BaseException) -> int:
    """The shell's code for a run stopped by a signal: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    return 128 + getattr(stop, "signum", getattr(stop, "sigval", signal.SIGINT))


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises `Interrupted`, as Ctrl-C raises KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_message(cfg: Optional[DictConfig]) -> str:
    """What an interrupted run leaves behind: for a training run, the checkpoint it resumes from, if any."""
    if cfg is None or "resume_from_checkpoint" not in cfg or not cfg.get("output_dir"):
        return "the run stopped before it finished"
    from qattune.training.checkpoint_dirs import list_step_dirs  # only a training run has checkpoints

    steps = list_step_dirs(str(cfg.output_dir))
    if not steps:
        return (f"no checkpoint was written to {cfg.output_dir} yet, so there is nothing to resume: run again to "
                "start over")
    return (f"checkpoints are written whole or not at all; resume_from_checkpoint=true continues from the latest, "
            f"{steps[-1][1]}")


def recipe_main(recipe: Callable[[DictConfig], Any], recipe_file: str, argv: Sequence[str] | None = None) -> None:
    """Run `recipe(cfg)` from the command line; user mistakes exit with code 2 and no traceback, and Ctrl-C or
    SIGTERM (in one process; under torchrun the launcher's signal) with one line and 130 or 143."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        if wants_help(argv):
            print(recipe_usage(Path(recipe_file)))
            return
        config, overrides = parse_recipe_args(argv)
        cfg = load_and_validate(config, overrides, recipe_file)
        with sigterm_interrupts() if "RANK" not in os.environ else nullcontext():
            recipe(cfg)
    except QattuneError as err:
        report_and_exit(err)
    except KeyboardInterrupt as stop:  # no traceback; a checkpoint is written whole or not at all
        report(interrupted_message(cfg), kind="interrupted")
        sys.exit(interrupt_exit_code(stop))
