"""Find the shipped recipes and configs from the files themselves (no hand-kept registry).

A recipe is a `recipes/<name>.py` script whose module docstring's first line describes it. A config is a
`configs/<name>.yaml` file whose header names the recipe it belongs to with a `# recipe: <name>` comment.
Both folders ship inside the installed package as `qattune.recipes` and `qattune.configs`. Nothing here
imports torch or parses YAML, so `qattune ls` stays fast.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from qattune.errors import QattuneError
from qattune.config.suggest import did_you_mean

# torchtune's recipe names -> the qattune recipe that runs their configs
TORCHTUNE_RECIPES = {
    "full_finetune_single_device": "full_finetune",
    "full_finetune_distributed": "full_finetune",
    "qat_single_device": "qat_distributed",
    "lora_finetune_single_device": "qat_lora",  # with no quantizer, qat_lora is plain LoRA
    "lora_finetune_distributed": "qat_lora",
    "qat_lora_finetune_distributed": "qat_lora",
    "eleuther_eval": "eval",
    "dev/generate_v2": "generate",
}


_RECIPE_HEADER = re.compile(r"^#\s*recipe:\s*([\w\-./]+)\s*$")
_TUNE_RUN_HEADER = re.compile(r"^#\s*tune run\s+(?:--?[\w\-]+(?:[ =]\S+)?\s+)*([\w\-./]+)\s+--config\b")
_HEADER_LINES = 30


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    path: Path
    description: str


@dataclass(frozen=True)
class ConfigInfo:
    name: str
    path: Path
    recipe: str | None


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QattuneError(f"the qattune installation is incomplete: package {package} is missing; reinstall qattune")
    return Path(list(spec.submodule_search_locations)[0])


def recipes_dir() -> Path:
    return _package_dir("qattune.recipes")


def configs_dir() -> Path:
    return _package_dir("qattune.configs")


def _describe(path: Path) -> str:
    """The first line of the recipe's docstring, read from its source."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ""
    return doc.strip().splitlines()[0] if doc else ""


@lru_cache(maxsize=None)
def list_recipes() -> tuple[RecipeInfo, ...]:
    """Every shipped recipe, sorted by name."""
    found = []
    for path in sorted(recipes_dir().glob("*.py")):
        if not path.stem.startswith("_"):
            found.append(RecipeInfo(path.stem, path, _describe(path)))
    return tuple(found)


def config_recipe(path: Path) -> str | None:
    """The recipe named by a config file's `# recipe: NAME` header comment, else by a torchtune config's
    `# tune run [launcher options] NAME --config ...` comment (as the qattune recipe that runs it), if any."""
    torchtune = None
    try:
        with open(path, encoding="utf-8") as f:
            for _, line in zip(range(_HEADER_LINES), f):
                match = _RECIPE_HEADER.match(line.strip())
                if match:
                    return match.group(1)
                launch = _TUNE_RUN_HEADER.match(line.strip())
                if launch and torchtune is None:
                    name = launch.group(1)
                    torchtune = TORCHTUNE_RECIPES.get(name, name if name in _recipe_names() else None)
    except OSError:
        return None
    return torchtune


def _recipe_names() -> set[str]:
    return {recipe.name for recipe in list_recipes()}


@lru_cache(maxsize=None)
def list_configs() -> tuple[ConfigInfo, ...]:
    """Every shipped config, sorted by name (`llama3/8B_qat_full` for `configs/llama3/8B_qat_full.yaml`)."""
    root = configs_dir()
    found = []
    for path in sorted(root.rglob("*.yaml")):
        name = path.relative_to(root).with_suffix("").as_posix()
        found.append(ConfigInfo(name, path, config_recipe(path)))
    return tuple(found)


def find_recipe(name: str) -> RecipeInfo:
    """A shipped recipe by name; an unknown name lists the valid ones (a torchtune name names qattune's)."""
    for recipe in list_recipes():
        if recipe.name == name:
            return recipe
    if name in TORCHTUNE_RECIPES:
        ours = TORCHTUNE_RECIPES[name]
        raise QattuneError(f"'{name}' is torchtune's recipe; qattune runs its configs with recipe '{ours}' "
                           f"(qattune run {ours} --config ...), on one process or under torchrun alike")
    names = [r.name for r in list_recipes()]
    hint = did_you_mean(name, names)
    raise QattuneError(f"unknown recipe '{name}'.{hint} Valid recipes: {', '.join(names)} (or a path to a .py file)")


def find_recipe_file(name: str, base: Path | None = None) -> Path:
    """A recipe script: a shipped recipe's by name, or a `.py` path (relative to the working folder, else to
    `base`, the folder of the config that names it)."""
    if not name.endswith(".py"):
        return find_recipe(name).path
    path = Path(name).expanduser()
    if not path.is_file() and base is not None and (base / path).is_file():
        path = base / path
    if not path.is_file():
        raise QattuneError(f"recipe file not found: {name}")
    return path


def find_config(name: str) -> Path:
    """A config by shipped name or by file path, with a friendly error for either kind of miss."""
    shipped = {c.name: c.path for c in list_configs()}
    if name in shipped:
        return shipped[name]
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml"):
        raise QattuneError(f"config file not found: {name} (check the path, or run `qattune ls` for shipped configs)")
    hint = did_you_mean(name, list(shipped))
    raise QattuneError(
        f"unknown config '{name}': neither a shipped config nor a file.{hint} Run `qattune ls` to list shipped configs"
    )
