"""What a recipe reads: a `Config` class in the recipe file, read statically by `qattune validate`.

    class Config(RecipeConfig):
        model: Component                       # a `_component_` node
        optimizer: Component("params")         # the recipe passes `params` when it builds it
        epochs: int = 1                        # a default makes the key optional
        max_steps_per_epoch: Optional[int] = None
        fsdp_cpu_offload: Unsupported("set it to false") = False   # any true value is refused
        ac_mode: Unsupported("remove the key", accept=(None,)) = None  # any value but these is refused

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
    """Annotation marker for a key read (say for torchtune configs) but honoured only at some values: any
    true value is refused, or with `accept`, any value not in it; `why` says what to do instead. Both are
    read statically: write literals, or names of module-level literal constants."""

    def __init__(self, why: str, accept: tuple | None = None):
        self.why, self.accept = why, accept


@dataclass(frozen=True)
class Refusal:
    why: str
    accept: tuple | None  # None: every false value

    def refuses(self, value: Any) -> bool:
        return bool(value) if self.accept is None else value not in self.accept

    def describe(self, value: Any) -> str:
        """`true is not supported: WHY`; after `key=` it is the line validate and run report."""
        shown = str(value).lower() if isinstance(value, bool) else value
        return f"{shown} is not supported: {self.why}"


class RecipeConfig:
    """Base class of a recipe's `Config`: its annotated fields are the config keys the recipe reads."""


@dataclass(frozen=True)
class SchemaField:
    name: str
    spec: TypeSpec
    required: bool
    provided: tuple[str, ...]  # call-time arguments of a component field
    default: Any = None  # the literal default of an optional field
    refused: Refusal | None = None  # an Unsupported(...) annotation


@dataclass(frozen=True)
class RecipeSchema:
    recipe: str
    fields: dict[str, SchemaField]


def _provided(annotation: ast.expr) -> tuple[str, ...]:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Component":
            return tuple(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return ()


def _refused(annotation: ast.expr, constants: dict[str, Any]) -> Refusal | None:
    for node in ast.walk(annotation):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Unsupported":
            why = _literal(node.args[0], constants) if node.args else None
            accept = next((_literal(k.value, constants) for k in node.keywords if k.arg == "accept"), None)
            return Refusal(why if isinstance(why, str) else "", tuple(accept) if accept is not None else None)
    return None


_NOT_LITERAL = object()


def _literal(node: ast.expr | None, constants: dict[str, Any] | None = None) -> Any:
    """The value of a literal (None, numbers, strings, lists...) or of a name in `constants` (also inside
    a tuple, `*NAME` included: `(None, *PADDED_COLLATES)`); None when it is neither."""
    value = _evaluate(node, constants or {}) if node is not None else None
    return None if value is _NOT_LITERAL else value


def _evaluate(node: ast.expr, constants: dict[str, Any]) -> Any:
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.Tuple):
        items = []
        for element in node.elts:
            starred = isinstance(element, ast.Starred)
            value = _evaluate(element.value if starred else element, constants)
            if value is _NOT_LITERAL or (starred and not isinstance(value, (tuple, list))):
                return _NOT_LITERAL
            items.extend(value if starred else [value])
        return tuple(items)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return _NOT_LITERAL


def _module_scope(tree: ast.Module) -> tuple[dict[str, str], dict[str, Any]]:
    """(local name -> dotted path for its `from x import y` lines, its module-level literal constants)."""
    names, constants = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = _literal(node.value, constants)
            if len(targets) == 1 and isinstance(targets[0], ast.Name) and value is not None:
                constants[targets[0].id] = value
    return names, constants


def _class_fields(cls: ast.ClassDef, resolve_base, constants: dict[str, Any]) -> dict[str, SchemaField] | None:
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
                                       _provided(stmt.annotation), _literal(stmt.value, constants),
                                       _refused(stmt.annotation, constants))
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
        base_imports, base_constants = _module_scope_of(where)
        return _class_fields(cls, _base_resolver(base_imports, where), base_constants)

    return resolve


def _module_scope_of(module: str) -> tuple[dict[str, str], dict[str, Any]]:
    from qattune.config.signatures import module_file

    path = module_file(module)
    try:
        return _module_scope(ast.parse(path.read_text(encoding="utf-8"))) if path else ({}, {})
    except (OSError, SyntaxError):
        return {}, {}


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
    imports, constants = _module_scope(tree)
    resolve = _base_resolver(imports, None)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = _class_fields(node, resolve, constants)
            if fields is not None:
                return RecipeSchema(path.stem, fields)
    return None
