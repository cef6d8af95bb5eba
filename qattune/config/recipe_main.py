"""The entry point every recipe script shares: `python recipe.py --config NAME [overrides]`.

`qattune run` executes recipe scripts through this same path, in-process or under torchrun, so a
recipe behaves identically however it is launched: parse arguments, load and compose the config,
apply overrides, validate everything against the recipe's `Config` schema, then call the recipe.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from qattune.config.loader import load_config
from qattune.config.schema import read_schema
from qattune.config.validate import validate_config
from qattune.errors import QattuneError, report_and_exit


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
            raise QattuneError(f"unknown option '{arg}': a recipe takes --config NAME and key=value overrides")
        else:
            overrides.append(arg)
    if not config:
        raise QattuneError("missing --config: name a shipped config (see `qattune ls`) or a YAML file")
    return config, overrides


def load_and_validate(config: str, overrides: Sequence[str], recipe_file: str | Path | None) -> DictConfig:
    """The composed config with overrides, raising one QattuneError that lists every problem found."""
    schema = read_schema(Path(recipe_file)) if recipe_file else None
    cfg = load_config(config, list(overrides), known_keys=schema.fields if schema else ())
    problems = validate_config(cfg, schema)
    if problems:
        against = f" for recipe '{schema.recipe}'" if schema else ""
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        lines = [f"{count} in config '{config}'{against}:"] + [str(p) for p in problems]
        raise QattuneError("\n".join(lines))
    if schema is not None:
        for name, field in schema.fields.items():
            if not field.required and name not in cfg:
                cfg[name] = field.default  # the recipe's default, so recipes read cfg.key directly
    return cfg


def recipe_main(recipe: Callable[[DictConfig], Any], recipe_file: str, argv: Sequence[str] | None = None) -> None:
    """Run `recipe(cfg)` from the command line; user mistakes exit with code 2 and no traceback."""
    try:
        config, overrides = parse_recipe_args(sys.argv[1:] if argv is None else argv)
        cfg = load_and_validate(config, overrides, recipe_file)
        recipe(cfg)
    except QattuneError as err:
        report_and_exit(err)
