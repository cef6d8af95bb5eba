"""Type annotations as small checkable specs, read from source (`ast`) or from live objects (`typing`).

Validation never needs the full typing system: it needs to know whether a YAML value (None, bool, int,
float, str, list, dict, or a nested `_component_`) can be what a parameter's annotation says. Anything
this module does not understand (a Tensor, a Module, a project class) becomes OPAQUE and accepts any
value, so validation reports only real mismatches.
"""

from __future__ import annotations

import ast
import typing
from dataclasses import dataclass
from typing import Any

COMPONENT_KEY = "_component_"


@dataclass(frozen=True)
class TypeSpec:
    """kind: any | opaque | none | bool | int | float | str | list | dict | literal | union | component."""

    kind: str
    args: tuple = ()

    def describe(self) -> str:
        if self.kind == "union":
            return " or ".join(a.describe() for a in self.args)
        if self.kind == "literal":
            return "one of " + ", ".join(repr(a) for a in self.args)
        if self.kind == "list" and self.args and self.args[0].kind not in ("any", "opaque"):
            return f"a list of {self.args[0].describe()}"
        if self.kind == "component":
            return "a component (a mapping with _component_)"
        return {"none": "null", "bool": "a bool", "int": "an int", "float": "a number", "str": "a string",
                "list": "a list", "dict": "a mapping"}.get(self.kind, self.kind)


ANY = TypeSpec("any")
OPAQUE = TypeSpec("opaque")
_SIMPLE = {
    "int": "int", "float": "float", "str": "str", "bool": "bool", "None": "none", "NoneType": "none",
    "list": "list", "List": "list", "Sequence": "list", "tuple": "list", "Tuple": "list", "set": "list",
    "dict": "dict", "Dict": "dict", "Mapping": "dict", "MutableMapping": "dict",
    "Any": "any", "object": "any", "Path": "str", "PathLike": "str", "PurePath": "str",
}


def _name_of(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def from_ast(node: ast.expr | None) -> TypeSpec:
    """A TypeSpec from an annotation's syntax tree (no evaluation, no imports)."""
    if node is None:
        return ANY
    if isinstance(node, ast.Constant):
        if node.value is None:
            return TypeSpec("none")
        if isinstance(node.value, str):  # a forward reference or a `from __future__ import annotations` string
            try:
                return from_ast(ast.parse(node.value, mode="eval").body)
            except SyntaxError:
                return OPAQUE
        return OPAQUE
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union([from_ast(node.left), from_ast(node.right)])
    if isinstance(node, ast.Subscript):
        outer = _name_of(node.value)
        inner = node.slice
        items = list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]
        if outer == "Optional":
            return _union([from_ast(items[0]), TypeSpec("none")])
        if outer == "Union":
            return _union([from_ast(i) for i in items])
        if outer == "Literal":
            return TypeSpec("literal", tuple(i.value for i in items if isinstance(i, ast.Constant)))
        if outer == "Annotated":
            return from_ast(items[0])
        kind = _SIMPLE.get(outer or "")
        if kind == "list":
            element = from_ast(items[0]) if outer not in ("tuple", "Tuple") else ANY
            return TypeSpec("list", (element,))
        if kind == "dict":
            return TypeSpec("dict")
        return OPAQUE
    if isinstance(node, ast.Call) and _name_of(node.func) == "Component":
        return TypeSpec("component")
    name = _name_of(node)
    if name == "Component":
        return TypeSpec("component")
    kind = _SIMPLE.get(name or "")
    return TypeSpec(kind) if kind else OPAQUE


def from_runtime(annotation: Any) -> TypeSpec:
    """A TypeSpec from a live annotation object (used when a component had to be imported)."""
    import inspect

    if annotation is inspect.Parameter.empty or annotation is Any:
        return ANY
    if annotation is None or annotation is type(None):
        return TypeSpec("none")
    if isinstance(annotation, str):
        return from_ast(ast.Constant(annotation))
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return _union([from_runtime(a) for a in args])
    if origin is typing.Literal:
        return TypeSpec("literal", tuple(args))
    if origin is typing.Annotated:
        return from_runtime(args[0])
    target = origin or annotation
    name = getattr(target, "__name__", None)
    kind = _SIMPLE.get(name or "")
    if kind == "list":
        element = from_runtime(args[0]) if args and name not in ("tuple", "Tuple") else ANY
        return TypeSpec("list", (element,))
    return TypeSpec(kind) if kind else OPAQUE


def _union(members: list[TypeSpec]) -> TypeSpec:
    flat: list[TypeSpec] = []
    for m in members:
        flat.extend(m.args if m.kind == "union" else (m,))
    if any(m.kind in ("any", "opaque") for m in flat):
        return OPAQUE
    return TypeSpec("union", tuple(flat))


def is_component_node(value: Any) -> bool:
    return isinstance(value, dict) and COMPONENT_KEY in value


def accepts(spec: TypeSpec, value: Any) -> bool:
    """Whether a plain YAML value (already resolved) can be of type `spec`."""
    kind = spec.kind
    if kind in ("any", "opaque"):
        return True
    if is_component_node(value):
        return kind != "none" and kind != "literal"  # a component may build anything else
    if kind == "union":
        return any(accepts(m, value) for m in spec.args)
    if kind == "none":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list":
        if not isinstance(value, (list, tuple)):
            return False
        return not spec.args or all(accepts(spec.args[0], v) for v in value)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "literal":
        return value in spec.args
    if kind == "component":
        return False
    return True
