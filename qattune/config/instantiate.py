"""Build objects from `_component_` config nodes.

    optimizer = instantiate(cfg.optimizer, model.parameters())   # call-time arguments merge in
    make_loss = partial(cfg.loss)                                 # a factory: call it later
    model = instantiate(cfg.model)                                # nested components are built first

A node's `_component_` is a dotted path to a callable (a class or a function); its other keys are
keyword arguments. `_partial_: true` inside a node makes it a `functools.partial` instead of a call.
torchtune paths are mapped through `qattune.config.aliases`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from qattune.config.aliases import Alias, RefusedArgument, torchtune_alias
from qattune.config.signatures import UnknownComponent, import_object, missing_package
from qattune.config.suggest import did_you_mean
from qattune.errors import QattuneError

COMPONENT_KEY = "_component_"
PARTIAL_KEY = "_partial_"


def to_plain(node: Any) -> Any:
    """OmegaConf nodes as plain dicts/lists with interpolations resolved."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def resolve_target(path: str, kwargs: dict[str, Any], where: str) -> tuple[Any, dict[str, Any]]:
    """The callable for `path` and the kwargs as it takes them (torchtune aliases applied)."""
    alias: Alias | None = torchtune_alias(path)
    if alias is not None:
        if alias.target is None:
            raise QattuneError(f"{where}: torchtune component '{path}' has no qattune counterpart: {alias.reason}")
        try:
            target_path, kwargs = alias.target, alias.translate(kwargs)
        except RefusedArgument as err:
            raise QattuneError(f"{where}: {err}") from None
    else:
        target_path = path
    try:
        return import_object(target_path), kwargs
    except UnknownComponent as err:
        hint = did_you_mean(target_path, err.candidates)
        if alias is not None:
            raise QattuneError(
                f"{where}: torchtune component '{path}' maps to '{target_path}', which is not available in qattune yet"
            ) from None
        raise QattuneError(f"{where}: {missing_package(path) or f'unknown component {path!r}.{hint}'}") from None


def _build(node: Any, where: str, args: tuple = (), overrides: dict[str, Any] | None = None,
           force_partial: bool = False) -> Any:
    if isinstance(node, list):
        return [_build(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if COMPONENT_KEY not in node:
        return {k: _build(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    path = node[COMPONENT_KEY]
    if not isinstance(path, str):
        raise QattuneError(f"{where}._component_ must be a dotted path string, got {path!r}")
    is_partial = force_partial or bool(node.get(PARTIAL_KEY, False))
    kwargs = {k: _build(v, f"{where}.{k}") for k, v in node.items() if k not in (COMPONENT_KEY, PARTIAL_KEY)}
    kwargs.update(overrides or {})
    target, kwargs = resolve_target(path, kwargs, where or "config")
    _check_call(target, args, kwargs, where or path, is_partial)
    if is_partial:
        return functools.partial(target, *args, **kwargs)
    return target(*args, **kwargs)


def _check_call(target: Any, args: tuple, kwargs: dict[str, Any], where: str, is_partial: bool) -> None:
    """Fail with the config key, not a deep TypeError, when the arguments do not fit the signature."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    try:
        (sig.bind_partial if is_partial else sig.bind)(*args, **kwargs)
    except TypeError as err:
        raise QattuneError(f"{where}: cannot call {getattr(target, '__qualname__', target)}: {err}") from None


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object a `_component_` node describes; `args`/`kwargs` are merged into its arguments.

    A node without `_component_` is returned as plain data (nested components inside it are built);
    None gives None, so optional components can be left empty in the config.
    """
    if node is None:
        return None
    where = _key_of(node)
    plain = to_plain(node)
    if not isinstance(plain, dict) or COMPONENT_KEY not in plain:
        if args or kwargs:
            raise QattuneError(f"{where or 'config'}: has no _component_ to call with the given arguments")
        return _build(plain, where)
    return _build(plain, where, args, kwargs)


def partial(node: Any, *args: Any, **kwargs: Any) -> functools.partial:
    """Like `instantiate`, but return a `functools.partial` to call later (a factory)."""
    plain = to_plain(node)
    if not isinstance(plain, dict) or COMPONENT_KEY not in plain:
        raise QattuneError(f"{_key_of(node) or 'config'}: a factory needs a _component_")
    return _build(plain, _key_of(node), args, kwargs, force_partial=True)


def _key_of(node: Any) -> str:
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return node._get_full_key(None) or ""
        except Exception:
            return ""
    return ""
