"""Command-line overrides in hydra-core's grammar, applied to an OmegaConf config.

| form | meaning |
|---|---|
| `a.b=v` | change an existing key (values: `1`, `2e-5`, `true`, `null`, `[1,2]`, `{k: v}`, `'quoted str'`, `${x.y}`) |
| `+a.new=v` | add a key that does not exist yet |
| `++a.b=v` | set a key whether or not it exists |
| `~a.b` | delete a key |
| `model=pkg.fn` | shorthand for `model._component_=pkg.fn` when `model` is a component |

Parsing is hydra-core's (`OverridesParser`); this module only applies the parsed overrides. Sweeps
(`a=1,2`, `range()`, `choice()`...) belong to hydra's multirun and are refused: one run, one value.
"""

from __future__ import annotations

import re
from typing import Any, Collection

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qattune.config.suggest import did_you_mean
from qattune.errors import QattuneError

COMPONENT_KEY = "_component_"
_MISSING = object()
_SWEEP_FUNCTION = re.compile(r"^\s*(\w+)\(")


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else []:
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, DictConfig):
            keys.extend(_all_keys(value, path + "."))
    return keys


def _select(cfg: DictConfig, key: str) -> Any:
    """The node at dotted `key` (list items by index: `tags.0`), or _MISSING."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        elif isinstance(node, DictConfig) and part in node.keys():
            node = node._get_node(part)
        else:
            return _MISSING
    return node


def _no_such_key(cfg: DictConfig, key: str, original: str, known_keys: Collection[str] | None) -> QattuneError:
    """A plain `key=value` for a key the config lacks. With a recipe known, an unknown top-level key is no
    key of the recipe either, so `+` would not help: say so instead of suggesting it."""
    if known_keys is not None and "." not in key:
        hint = did_you_mean(key, [*_all_keys(cfg), *known_keys])
        return QattuneError(f"cannot override '{key}': neither the config nor its recipe has such a key.{hint}")
    hint = did_you_mean(key, _all_keys(cfg))
    value = original.split("=", 1)[1]
    return QattuneError(f"cannot override '{key}': the config has no such key.{hint} To add it, write +{key}={value}")


def _sweep_error(text: str) -> QattuneError:
    """Hydra reads `a=x, y` as a sweep over x and y; qattune runs once, so name the fix."""
    left, _, right = text.partition("=")
    function = _SWEEP_FUNCTION.match(right)
    if function:
        return QattuneError(f"override '{text}' is a sweep ({function.group(1)}()), which qattune does not support; "
                            "set a single value")
    quoted = right.strip().replace("'", "\\'")
    return QattuneError(f"override '{text}' is a sweep (a comma separates values), which qattune does not support; "
                        f"quote a value that contains a comma: \"{left}='{quoted}'\"")


def _parse(text: str) -> Any:
    if "=" not in text and not text.startswith("~"):
        raise QattuneError(
            f"override '{text}' has no '=': write key=value to change a key, +key=value to add one, ~key to delete one"
        )
    try:
        override = _parser().parse_override(text)
    except Exception as err:  # hydra's OverrideParseException and friends
        detail = str(err).strip().splitlines()[0]
        raise QattuneError(f"cannot parse override '{text}': {detail}; see `qattune run --help` for the syntax") from None
    if override.is_sweep_override():
        raise _sweep_error(text)
    return override


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = cfg if not parent_key else OmegaConf.select(cfg, parent_key)
    del parent[int(leaf) if isinstance(parent, ListConfig) else leaf]


def _is_component_argument(cfg: DictConfig, key: str) -> bool:
    """Whether `key` names an argument of a `_component_` node (as `optimizer.betas`): setting one the config
    leaves out needs no `+`, as in torchtune; validation checks it against the component's signature."""
    parent, _, name = key.rpartition(".")
    node = _select(cfg, parent) if parent else _MISSING
    return isinstance(node, DictConfig) and COMPONENT_KEY in node and name not in (COMPONENT_KEY, "_partial_")


def apply_override(cfg: DictConfig, text: str, known_keys: Collection[str] | None = None) -> None:
    """Apply one override string to `cfg` in place.

    `known_keys` are keys the recipe reads (None: no recipe is known): `key=value` may set one even when
    the config leaves it out (the recipe's default applies otherwise), without the `+` that adding needs;
    so may an argument of a `_component_` node (validation checks it against the component's signature).
    """
    override = _parse(text)
    key = override.key_or_group
    existing = _select(cfg, key)
    if override.is_delete():
        if existing is _MISSING:
            raise QattuneError(f"cannot delete '{key}' ({text}): the config has no such key.{did_you_mean(key, _all_keys(cfg))}")
        _delete(cfg, key)
        return
    value = override.value()
    if override.is_add() and existing is not _MISSING:
        raise QattuneError(
            f"cannot add '{key}' ({text}): the key already exists; write {key}=... to change it or ++{text[1:]} to force"
        )
    adding = existing is _MISSING and key not in (known_keys or ()) and not _is_component_argument(cfg, key)
    if not override.is_add() and not override.is_force_add() and adding:
        raise _no_such_key(cfg, key, text, known_keys)
    if isinstance(existing, DictConfig) and COMPONENT_KEY in existing and isinstance(value, str):
        key, value = f"{key}.{COMPONENT_KEY}", value
    try:
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    except (OmegaConfBaseException, ValueError, LookupError) as err:  # e.g. `+tags.x=1` where tags is a list
        raise QattuneError(f"cannot apply override '{text}': {str(err).splitlines()[0]}") from None


def override_problems(cfg: DictConfig, overrides: list[str], known_keys: Collection[str] | None = None) -> list[str]:
    """Apply overrides in order, skipping bad ones; one message per bad override."""
    problems = []
    for text in overrides:
        try:
            apply_override(cfg, text, known_keys)
        except QattuneError as err:
            problems.append(str(err))
    return problems


def apply_overrides(cfg: DictConfig, overrides: list[str], known_keys: Collection[str] | None = None) -> DictConfig:
    """Apply overrides in order; every bad override is reported together, not only the first."""
    problems = override_problems(cfg, overrides, known_keys)
    if problems:
        raise QattuneError("\n".join(problems))
    return cfg
