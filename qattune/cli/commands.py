"""The light verbs: `ls`, `cp`, `cat`, `validate`. None of them imports torch."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from qattune.config.discovery import ConfigInfo, config_recipe, find_config, find_recipe, list_configs, list_recipes
from qattune.errors import QattuneError


def ls_command(args: argparse.Namespace) -> None:
    """A table of recipes and the shipped configs that belong to each."""
    recipes = list_recipes()
    by_recipe: dict[str, list[ConfigInfo]] = {}
    for config in list_configs():
        by_recipe.setdefault(config.recipe or "", []).append(config)
    width = max([len("RECIPE")] + [len(r.name) for r in recipes]) + 3
    print(f"{'RECIPE':<{width}}CONFIG")
    for recipe in recipes:
        configs = [c.name for c in by_recipe.pop(recipe.name, [])] or ["-"]
        print(f"{recipe.name:<{width}}{configs[0]}")
        for name in configs[1:]:
            print(f"{'':<{width}}{name}")
        if args.verbose and recipe.description:
            print(f"{'':<{width}}  {recipe.description}")
    for recipe_name, configs in sorted(by_recipe.items()):
        label = f"(no recipe: {recipe_name})" if recipe_name else "(no recipe header)"
        for config in configs:
            print(f"{label:<{width}}{config.name}")


def _copy_source(name: str, destination: str) -> Path:
    """The file `qattune cp NAME DEST` copies: a config, or a recipe script when NAME is only a recipe
    or DEST ends in .py (names such as `eval` are both)."""
    configs = {c.name: c.path for c in list_configs()}
    recipes = {r.name: r.path for r in list_recipes()}
    wants_script = destination.endswith(".py")
    if name in recipes and (wants_script or name not in configs):
        return recipes[name]
    if name in configs:
        return configs[name]
    from qattune.config.suggest import did_you_mean

    hint = did_you_mean(name, [*configs, *recipes])
    raise QattuneError(f"nothing to copy: '{name}' is neither a shipped config nor a recipe.{hint} See `qattune ls`")


def cp_command(args: argparse.Namespace) -> None:
    """Copy a shipped config or recipe to a file the user can edit."""
    source = _copy_source(args.name, args.destination)
    target = Path(args.destination).expanduser()
    if target.is_dir():
        target = target / source.name
    elif target.suffix == "":
        target = target.with_suffix(source.suffix)
    elif target.suffix not in (".yaml", ".yml", ".py") or (target.suffix == ".py") != (source.suffix == ".py"):
        kind = "recipe script (.py)" if source.suffix == ".py" else "config (.yaml)"
        raise QattuneError(f"cannot copy '{args.name}' to {target}: it is a {kind}; give the destination that suffix")
    if target.exists() and not args.force:
        raise QattuneError(f"{target} already exists; pass --force to overwrite it")
    if not target.parent.exists():
        if not args.make_parents:
            raise QattuneError(f"cannot copy to {target}: folder {target.parent} does not exist (add --make-parents to create it)")
        target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)
    print(f"Copied {source.name} to {target}")


def cat_command(args: argparse.Namespace) -> None:
    """Print the composed config with overrides applied (interpolations kept unless --resolve)."""
    from omegaconf import OmegaConf

    from qattune.config.loader import load_config

    cfg = load_config(args.config, args.overrides)
    print(OmegaConf.to_yaml(cfg, resolve=args.resolve), end="")


def validate_command(args: argparse.Namespace) -> None:
    """Check a config (and overrides) against its recipe and every component's signature."""
    from qattune.config.recipe_main import load_and_validate

    recipe_name = args.recipe or config_recipe(find_config(args.config))
    recipe_file = None
    if recipe_name:
        recipe_file = Path(recipe_name) if recipe_name.endswith(".py") else find_recipe(recipe_name).path
        if not recipe_file.is_file():
            raise QattuneError(f"recipe file not found: {recipe_file}")
    load_and_validate(args.config, args.overrides, recipe_file)
    against = f" for recipe '{recipe_file.stem}'" if recipe_file else " (no recipe named: components only)"
    print(f"Config '{args.config}' is valid{against}.")


def demo_command(args: argparse.Namespace) -> None:
    """Run the embedded QAT-vs-PTQ demo (see qattune/demo.py)."""
    from qattune.demo import run_demo

    if args.steps < 1:
        raise QattuneError(f"--steps {args.steps}: each fine-tune needs at least 1 step")
    run_demo(args.output_dir, args.steps, args.eval_documents)
