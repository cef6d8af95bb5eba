"""What a recipe reads: a `Config` class in the recipe file, read statically by `qattune validate`.

    class Config(RecipeConfig):
        model: Component                       # a `_component_` node
        optimizer: Component("params")         # the recipe passes `params` when it builds it
        epochs: int = 1                        # a default makes the key optional
        max_steps_per_epoch: Optional[int] = None

The class body is parsed with `ast` (the recipe is never imported to validate a config), so validation
costs milliseconds. The same annotations drive the type checks of component arguments.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from qattune.config import typespec
from qattune.config.typespec import TypeSpec

SCHEMA_BASE = "RecipeConfig"


class Component:
    """Annotation marker for a config key that holds a `_component_` node.

    `Component("params")` lists arguments the recipe supplies at call time, so a config need not set them.
    """

    def __init__(self, *provided: str):
        self.provided = provided

    def __repr__(self) -> str:
        return f"Component({', '.join(map(repr, self.provided))})"


class RecipeConfig:
    """Base class of a recipe's `Config`: its annotated fields are the config keys the recipe reads."""


@dataclass(frozen=True)
class SchemaField:
    name: str
    spec: TypeSpec
    required: bool
    provided: tuple[str, ...]  # call-time arguments of a component field
    default: Any = None  # the literal default of an optional field


@dataclass(frozen=True)
class RecipeSchema:
    recipe: str
    fields: dict[str, SchemaField]


def _provided(annotation: ast.expr) -> tuple[str, ...]:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Component":
            return tuple(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return ()


def _literal(node: ast.expr | None) -> Any:
    """A field's default when it is a literal (None, numbers, strings, lists...); None otherwise."""
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted path, for the `from x import y` lines of a recipe file."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _class_fields(cls: ast.ClassDef, resolve_base) -> dict[str, SchemaField] | None:
    """Fields of a RecipeConfig subclass, inherited ones first; None if it is not one."""
    fields: dict[str, SchemaField] = {}
    is_schema = False
    for base in cls.bases:
        name = getattr(base, "id", None) or getattr(base, "attr", None)
        if name == SCHEMA_BASE:
            is_schema = True
            continue
        inherited = resolve_base(base)
        if inherited is not None:
            fields.update(inherited)
            is_schema = True
    if not is_schema:
        return None
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            name = stmt.target.id
            fields[name] = SchemaField(name, typespec.from_ast(stmt.annotation), stmt.value is None,
                                       _provided(stmt.annotation), _literal(stmt.value))
    return fields


def _base_resolver(imports: dict[str, str], module: str | None):
    """Resolves a base-class expression to the fields of the RecipeConfig subclass it names, statically."""
    from qattune.config.signatures import find_class

    def resolve(base: ast.expr) -> dict[str, SchemaField] | None:
        name = getattr(base, "id", None)
        if name is None:
            return None
        dotted = imports.get(name) or (f"{module}.{name}" if module else None)
        found = find_class(dotted) if dotted else None
        if found is None:
            return None
        cls, where = found
        return _class_fields(cls, _base_resolver(_imported_names_of(where), where))

    return resolve


def _imported_names_of(module: str) -> dict[str, str]:
    from qattune.config.signatures import module_file

    path = module_file(module)
    try:
        return _imported_names(ast.parse(path.read_text(encoding="utf-8"))) if path else {}
    except (OSError, SyntaxError):
        return {}


@lru_cache(maxsize=None)
def read_schema(path: Path) -> RecipeSchema | None:
    """The schema declared by the recipe file at `path` (base classes included), or None if it has none."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    resolve = _base_resolver(_imported_names(tree), None)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = _class_fields(node, resolve)
            if fields is not None:
                return RecipeSchema(path.stem, fields)
    return None
