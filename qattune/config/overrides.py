"""Command-line overrides in hydra-core's grammar, applied to an OmegaConf config.

| form | meaning |
|---|---|
| `a.b=v` | change an existing key (values: `1`, `2e-5`, `true`, `null`, `[1,2]`, `{k: v}`, `'quoted str'`, `${x.y}`) |
| `+a.new=v` | add a key that does not exist yet |
| `++a.b=v` | set a key whether or not it exists |
| `~a.b` | delete a key |
| `model=pkg.fn` | shorthand for `model._component_=pkg.fn` when `model` is a component |

Parsing is hydra-core's (`OverridesParser`); this module only applies the parsed overrides.
"""

from __future__ import annotations

from typing import Any, Collection

from omegaconf import DictConfig, OmegaConf

from qattune.config.suggest import did_you_mean
from qattune.errors import QattuneError

COMPONENT_KEY = "_component_"
_MISSING = object()


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
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return _MISSING
        node = node._get_node(part)
    return node


def _no_such_key(cfg: DictConfig, key: str, original: str) -> QattuneError:
    hint = did_you_mean(key, _all_keys(cfg))
    value = original.split("=", 1)[1] if "=" in original else "..."
    return QattuneError(f"cannot override '{key}': the config has no such key.{hint} To add it, write +{key}={value}")


def _parse(text: str) -> Any:
    if "=" not in text and not text.startswith("~"):
        raise QattuneError(
            f"override '{text}' has no '=': write key=value to change a key, +key=value to add one, ~key to delete one"
        )
    try:
        return _parser().parse_override(text)
    except Exception as err:  # hydra's OverrideParseException and friends
        detail = str(err).strip().splitlines()[0]
        raise QattuneError(f"cannot parse override '{text}': {detail}; see `qattune run --help` for the syntax") from None


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = cfg if not parent_key else OmegaConf.select(cfg, parent_key)
    del parent[leaf]


def apply_override(cfg: DictConfig, text: str, known_keys: Collection[str] = ()) -> None:
    """Apply one override string to `cfg` in place.

    `known_keys` are keys the recipe reads: `key=value` may set one even when the config leaves it out
    (the recipe's default applies otherwise), without the `+` that adding an unknown key needs.
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
    if not override.is_add() and not override.is_force_add() and existing is _MISSING and key not in known_keys:
        raise _no_such_key(cfg, key, text)
    if isinstance(existing, DictConfig) and COMPONENT_KEY in existing and isinstance(value, str):
        key, value = f"{key}.{COMPONENT_KEY}", value
    OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def apply_overrides(cfg: DictConfig, overrides: list[str], known_keys: Collection[str] = ()) -> DictConfig:
    """Apply overrides in order; every bad override is reported, not only the first."""
    problems = []
    for text in overrides:
        try:
            apply_override(cfg, text, known_keys)
        except QattuneError as err:
            problems.append(str(err))
    if problems:
        raise QattuneError("\n".join(problems))
    return cfg
