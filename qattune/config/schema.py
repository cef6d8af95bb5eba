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


@dataclass(frozen=True)
class RecipeSchema:
    recipe: str
    fields: dict[str, SchemaField]


def _provided(annotation: ast.expr) -> tuple[str, ...]:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Component":
            return tuple(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return ()


@lru_cache(maxsize=None)
def read_schema(path: Path) -> RecipeSchema | None:
    """The schema declared by the recipe file at `path`, or None if it declares none."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == SCHEMA_BASE for b in node.bases):
            fields = {}
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    name = stmt.target.id
                    fields[name] = SchemaField(
                        name, typespec.from_ast(stmt.annotation), stmt.value is None, _provided(stmt.annotation)
                    )
            return RecipeSchema(path.stem, fields)
    return None
