"""The light verbs: `ls`, `cp`, `cat`, `validate`. None of them imports torch."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from qattune.config.discovery import ConfigInfo, list_configs, list_recipes
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


def _copy_target(name: str, destination: str, source: Path) -> Path:
    """The file to write: DEST, DEST/<source name> for a folder, or DEST plus the source's suffix."""
    target = Path(destination).expanduser()
    if target.is_dir():
        return target / source.name
    if target.suffix == "":
        return target.with_suffix(source.suffix)
    if target.suffix not in (".yaml", ".yml", ".py") or (target.suffix == ".py") != (source.suffix == ".py"):
        kind = "recipe script (.py)" if source.suffix == ".py" else "config (.yaml)"
        raise QattuneError(f"cannot copy '{name}' to {target}: it is a {kind}; give the destination that suffix")
    return target


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing ancestor of `folder` (itself included) when it is a file, not a folder."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def _make_folder(target: Path, make_parents: bool) -> None:
    folder = target.parent
    blocking = _file_in_the_way(folder)
    if blocking is not None:
        raise QattuneError(f"cannot copy to {target}: {blocking} is a file, not a folder")
    if folder.exists():
        return
    if not make_parents:
        raise QattuneError(f"cannot copy to {target}: folder {folder} does not exist (add --make-parents to create it)")
    try:
        folder.mkdir(parents=True)
    except OSError as err:
        raise QattuneError(f"cannot copy to {target}: cannot create folder {folder} ({err.strerror})") from None


def cp_command(args: argparse.Namespace) -> None:
    """Copy a shipped config or recipe to a file the user can edit."""
    source = _copy_source(args.name, args.destination)
    target = _copy_target(args.name, args.destination, source)
    if target.exists() and not args.force:
        raise QattuneError(f"{target} already exists; pass --force to overwrite it")
    _make_folder(target, args.make_parents)
    try:
        shutil.copyfile(source, target)
    except OSError as err:
        raise QattuneError(f"cannot copy to {target}: {err.strerror or err}") from None
    print(f"Copied {source.name} to {target}")


def cat_command(args: argparse.Namespace) -> None:
    """Print the composed config with overrides applied (interpolations kept unless --resolve); keys its
    recipe reads may be set without `+`, as for `validate` and `run`."""
    from omegaconf import OmegaConf

    from qattune.config.loader import load_config
    from qattune.config.recipe_main import config_recipe_file
    from qattune.config.schema import read_schema
    from qattune.config.validate import resolution_problems

    recipe_file = config_recipe_file(args.config)
    schema = read_schema(recipe_file) if recipe_file else None
    cfg = load_config(args.config, args.overrides, known_keys=schema.fields if schema else None)
    if args.resolve and (problems := resolution_problems(cfg)):
        count = f"{len(problems)} value{'s' if len(problems) > 1 else ''}"
        raise QattuneError("\n".join([f"cannot resolve {count} of config '{args.config}':", *map(str, problems)]))
    print(OmegaConf.to_yaml(cfg, resolve=args.resolve), end="")


def validate_command(args: argparse.Namespace) -> None:
    """Check a config (and overrides) against its recipe and every component's signature."""
    from qattune.config.recipe_main import config_recipe_file, load_and_validate
    from qattune.config.schema import require_schema

    recipe_file = config_recipe_file(args.config, args.recipe)
    if recipe_file is not None:
        require_schema(recipe_file)
    load_and_validate(args.config, args.overrides, recipe_file)
    if recipe_file is not None:
        print(f"Config '{args.config}' is valid for recipe '{recipe_file.stem}'.")
    else:
        print(f"Config '{args.config}' has valid components; no recipe is known, so its keys were not checked "
              "(pass --recipe NAME, or give it a '# recipe: NAME' header).")


def demo_command(args: argparse.Namespace) -> None:
    """Run the embedded QAT-vs-PTQ demo (see qattune/demo.py)."""
    from qattune.demo import run_demo

    if args.steps < 1:
        raise QattuneError(f"--steps {args.steps}: each fine-tune needs at least 1 step")
    run_demo(args.output_dir, args.steps, args.eval_documents)
