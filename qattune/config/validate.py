"""Check a whole config before any heavy work: recipe keys, components, argument names and types.

Every problem is collected and reported together, one line each, as `key.path: what is wrong`, with a
"did you mean" suggestion where a close valid name exists. Component signatures are read from source
(see `signatures`), so validating a config that names torch components does not import torch.

Without a recipe schema, top-level components are not checked for missing arguments: the recipe may
pass them at call time (an optimizer's `params`), and only its `Config` says which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

from qattune.config.aliases import torchtune_alias
from qattune.config.schema import RecipeSchema
from qattune.config.signatures import (ComponentImportError, Signature, UnknownComponent, component_signature,
                                       missing_package)
from qattune.config.suggest import did_you_mean
from qattune.config.typespec import COMPONENT_KEY, TypeSpec, accepts, is_component_node

PARTIAL_KEY = "_partial_"
_SPECIAL_KEYS = (COMPONENT_KEY, PARTIAL_KEY)
ANY_PROVIDED = None  # `provided` when the recipe is unknown: it may pass any argument
DEVICE_KEY = "device"
# torch.device's type names (c10 DeviceType), with an optional index: cpu, cuda, cuda:1, mps, meta, ...
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta|hip|hpu|mtia|maia|xla|lazy|ipu|ve|fpga|vulkan|privateuseone|"
                     r"mkldnn|opengl|opencl|ideep)(:(0|[1-9][0-9]*))?")


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    sep: str = ": "  # "=" for `key=value is not supported: ...`

    def __str__(self) -> str:
        return f"{self.key}{self.sep}{self.message}" if self.key else self.message


class _Unresolved:
    """Stands in for a value whose interpolation failed (already reported); it is not type-checked."""


UNRESOLVED = _Unresolved()


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}[{key}]" if isinstance(key, int) else (f"{prefix}.{key}" if prefix else str(key))


def _unresolved(err: OmegaConfBaseException) -> str:
    first = str(err).splitlines()[0]
    if isinstance(err, InterpolationToMissingValueError):  # `${a}` where `a: ???`
        return f"it refers to {first.rpartition(': ')[2]}, which has no value (???)"
    return f"cannot resolve its value: {first}"


def _resolve(node: Any, prefix: str, problems: list[Problem]) -> Any:
    """Plain data with interpolations resolved leaf by leaf, so one bad `${...}` does not hide the rest."""
    if isinstance(node, DictConfig):
        items = {}
        for key in node.keys():
            path = _join(prefix, key)
            try:
                child = node._get_node(key)
                value = child if isinstance(child, (DictConfig, ListConfig)) else node[key]
            except MissingMandatoryValue:
                problems.append(Problem(path, f"a value is required (the config has ???); set it with {path}=..."))
                items[key] = UNRESOLVED
                continue
            except OmegaConfBaseException as err:
                problems.append(Problem(path, _unresolved(err)))
                items[key] = UNRESOLVED
                continue
            items[key] = _resolve(value, path, problems)
        return items
    if isinstance(node, ListConfig):
        out = []
        for i in range(len(node)):
            try:
                child = node._get_node(i)
                value = child if isinstance(child, (DictConfig, ListConfig)) else node[i]
            except OmegaConfBaseException as err:
                problems.append(Problem(_join(prefix, i), _unresolved(err)))
                value = UNRESOLVED
            out.append(_resolve(value, _join(prefix, i), problems))
        return out
    return node


def resolution_problems(cfg: DictConfig) -> list[Problem]:
    """One problem per `${...}` that cannot be resolved and per required `???` value left unset."""
    problems: list[Problem] = []
    _resolve(cfg, "", problems)
    return problems


def _device_problem(path: str, value: Any) -> Problem | None:
    """A `device` string torch.device would refuse (checked by form, without importing torch)."""
    if not isinstance(value, str) or _DEVICE.fullmatch(value):
        return None
    return Problem(path, f"expected a device such as cpu, cuda, cuda:N (N a GPU index), mps or xpu, got {value!r}")


def _type_problem(path: str, value: Any, spec: TypeSpec) -> Problem | None:
    if value is UNRESOLVED or accepts(spec, value):
        return None
    return Problem(path, f"expected {spec.describe()}, got {value!r}")


class _Validator:
    def __init__(self, schema: RecipeSchema | None):
        self.schema = schema
        self.problems: list[Problem] = []

    def run(self, cfg: DictConfig) -> list[Problem]:
        plain = _resolve(cfg, "", self.problems)
        if self.schema is not None:
            self._check_recipe_keys(plain)
        self._walk(plain, "", provided=())
        return self.problems

    def _add(self, problem: Problem | None) -> None:
        if problem is not None:
            self.problems.append(problem)

    def _check_recipe_keys(self, plain: dict[str, Any]) -> None:
        fields = self.schema.fields
        for key, value in plain.items():
            field = fields.get(key)
            if field is None:
                hint = did_you_mean(key, fields)
                self.problems.append(Problem(key, f"unknown key for recipe '{self.schema.recipe}'.{hint}"))
                continue
            if field.spec.kind == "component" and not is_component_node(value) and value is not UNRESOLVED:
                self.problems.append(Problem(key, f"expected a component (a mapping with _component_), got {value!r}"))
            elif field.refused is not None and field.refused.refuses(value):
                self.problems.append(Problem(key, field.refused.describe(value), sep="="))
            else:
                self._add(_type_problem(key, value, field.spec))
        for name, field in fields.items():
            if field.required and name not in plain:
                self.problems.append(Problem(name, f"missing: recipe '{self.schema.recipe}' needs this key"))

    def _provided_for(self, key: str) -> tuple[str, ...] | None:
        """Arguments the recipe passes to the component at top-level `key` (ANY_PROVIDED: unknown)."""
        if "." in key or "[" in key:
            return ()
        if self.schema is None:
            return ANY_PROVIDED
        field = self.schema.fields.get(key)
        return field.provided if field else ()

    def _walk(self, value: Any, path: str, provided: tuple[str, ...] | None) -> None:
        if isinstance(value, list):
            for i, item in enumerate(value):
                self._walk(item, _join(path, i), provided)  # a list of components is built item by item
        elif isinstance(value, dict):
            if COMPONENT_KEY in value:
                self._check_component(value, path, provided)
            for key, item in value.items():
                if key not in _SPECIAL_KEYS:
                    child = _join(path, key)
                    if key == DEVICE_KEY:
                        self._add(_device_problem(child, item))
                    self._walk(item, child, self._provided_for(child))

    def _check_component(self, node: dict[str, Any], path: str, provided: tuple[str, ...] | None) -> None:
        where = _join(path, COMPONENT_KEY)
        target = node[COMPONENT_KEY]
        if target is UNRESOLVED:
            return
        if not isinstance(target, str):
            self.problems.append(Problem(where, f"must be a dotted path string, got {target!r}"))
            return
        kwargs = {k: v for k, v in node.items() if k not in _SPECIAL_KEYS}
        alias = torchtune_alias(target)
        if alias is not None:
            if alias.target is None:
                self.problems.append(Problem(where, f"torchtune component '{target}' has no qattune counterpart: {alias.reason}"))
                return
            refused = alias.refusals(kwargs)
            if refused:
                self.problems.extend(Problem(path, str(err)) for err in refused)
                return
            kwargs = alias.translate(kwargs)
        signature = self._signature(alias.target if alias else target, target, where)
        if signature is None:
            return
        self._check_arguments(signature, kwargs, path, provided, partial=bool(node.get(PARTIAL_KEY, False)))

    def _signature(self, path: str, written: str, where: str) -> Signature | None:
        try:
            return component_signature(path)
        except UnknownComponent as err:
            if path != written:
                message = f"torchtune component '{written}' maps to '{path}', which is not available in qattune yet"
            else:
                message = missing_package(written) or f"unknown component '{written}'.{did_you_mean(written, err.candidates)}"
        except ComponentImportError as err:
            message = f"component '{written}' exists but cannot be imported ({err}); install what it needs"
        self.problems.append(Problem(where, message))
        return None

    def _check_arguments(self, sig: Signature, kwargs: dict[str, Any], path: str, provided: tuple[str, ...] | None,
                         partial: bool) -> None:
        params = {p.name: p for p in sig.params if not p.positional_only}
        for name, value in kwargs.items():
            param = params.get(name)
            if param is None:
                if not sig.var_keyword:
                    hint = did_you_mean(name, params)
                    self.problems.append(Problem(_join(path, name), f"{sig.path} takes no argument '{name}'.{hint}"))
                continue
            self._add(_type_problem(_join(path, name), value, param.annotation))
        if partial or provided is ANY_PROVIDED:
            return
        for param in sig.params:
            if param.required and param.name not in kwargs and param.name not in provided:
                self.problems.append(
                    Problem(_join(path, param.name), f"missing required argument of {sig.path}; set {_join(path, param.name)}=...")
                )


def validate_config(cfg: DictConfig, schema: RecipeSchema | None = None) -> list[Problem]:
    """All problems found in `cfg` (against the recipe's schema when given); empty when it is valid."""
    return _Validator(schema).run(cfg)
