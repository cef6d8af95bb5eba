"""What a recipe reads: a `Config` class in the recipe file, read statically by `qattune validate`.

    class Config(RecipeConfig):
        model: Component                       # a `_component_` node
        optimizer: Component("params")         # the recipe passes `params` when it builds it
        epochs: int = 1                        # a default makes the key optional
        max_steps_per_epoch: Optional[int] = None
        fsdp_cpu_offload: Unsupported("set it to false") = False   # read for torchtune configs, refused when set

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
from qattune.errors import QattuneError

SCHEMA_BASE = "RecipeConfig"


class Component:
    """Annotation marker for a config key that holds a `_component_` node.

    `Component("params")` lists arguments the recipe supplies at call time, so a config need not set them.
    """

    def __init__(self, *provided: str):
        self.provided = provided

    def __repr__(self) -> str:
        return f"Component({', '.join(map(repr, self.provided))})"


class Unsupported:
    """Annotation marker for a key the recipe accepts only at its (false) default: any true value is
    refused, before anything runs, with `why` (what to do instead)."""

    def __init__(self, why: str):
        self.why = why


class RecipeConfig:
    """Base class of a recipe's `Config`: its annotated fields are the config keys the recipe reads."""


@dataclass(frozen=True)
class SchemaField:
    name: str
    spec: TypeSpec
    required: bool
    provided: tuple[str, ...]  # call-time arguments of a component field
    default: Any = None  # the literal default of an optional field
    refused: str | None = None  # Unsupported(why): why any true value is refused

    def refusal(self, value: Any) -> str:
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
        return f"{shown} is not supported: {self.refused}"


@dataclass(frozen=True)
class RecipeSchema:
    recipe: str
    fields: dict[str, SchemaField]


def _provided(annotation: ast.expr) -> tuple[str, ...]:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Component":
            return tuple(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return ()


def _refused(annotation: ast.expr) -> str | None:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Unsupported" and node.args:
            why = node.args[0]
            return why.value if isinstance(why, ast.Constant) and isinstance(why.value, str) else ""
    return None


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
                                       _provided(stmt.annotation), _literal(stmt.value), _refused(stmt.annotation))
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


def parse_recipe(path: Path) -> ast.Module:
    """A recipe file's syntax tree; an unreadable file or a syntax error is one line naming the place."""
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as err:
        raise QattuneError(f"recipe {path} has a syntax error at line {err.lineno}: {err.msg}; fix the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise QattuneError(f"cannot read recipe {path}: {getattr(err, 'strerror', None) or err}") from None


def require_schema(path: Path) -> RecipeSchema:
    """The recipe's schema, or one line saying why there is none to check keys against."""
    parse_recipe(path)
    schema = read_schema(path)
    if schema is None:
        raise QattuneError(f"recipe {path} declares no Config class (a {SCHEMA_BASE} subclass listing the keys "
                           "it reads), so a config cannot be checked against it; add one, as the shipped recipes do")
    return schema


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
