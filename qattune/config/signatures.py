"""Signatures of `_component_` targets, read from source without importing them when possible.

`qattune validate` must check `qattune.models.llama3_2_1b` or `torch.optim.AdamW` without paying for
`import torch` (over a second). So a dotted path is first resolved statically: locate the module file,
parse it with `ast`, follow `from x import y` re-exports and simple aliases, and read the function's or
class's parameters (a class's `__init__`, its bases', or its dataclass fields). Only when that fails (a
C extension, a generated object) is the module imported and `inspect.signature` used.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from qattune.config import typespec
from qattune.config.typespec import TypeSpec

_MAX_DEPTH = 12


@dataclass(frozen=True)
class Param:
    name: str
    required: bool
    annotation: TypeSpec
    positional_only: bool = False


@dataclass(frozen=True)
class Signature:
    path: str
    params: tuple[Param, ...]
    var_keyword: bool  # accepts **kwargs
    var_positional: bool  # accepts *args

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]


class UnknownComponent(LookupError):
    """The dotted path names nothing; `candidates` are names that do exist near it."""

    def __init__(self, path: str, candidates: list[str]):
        super().__init__(path)
        self.path = path
        self.candidates = candidates


# ---------------------------------------------------------------- locating modules without importing them


@lru_cache(maxsize=None)
def module_file(module: str) -> Path | None:
    """The source file of `module` (a package's `__init__.py`), found without executing any import."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    path = Path(spec.origin)
    for part in rest:
        if path.name != "__init__.py":
            return None
        folder = path.parent
        if (folder / part / "__init__.py").is_file():
            path = folder / part / "__init__.py"
        elif (folder / f"{part}.py").is_file():
            path = folder / f"{part}.py"
        else:
            return _mapped_subpackage(module)
    return path if path.suffix == ".py" else None


def _mapped_subpackage(module: str) -> Path | None:
    """Sub-packages installed from another folder (e.g. qattune.recipes -> recipes/) need the import system."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


@lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _top_level_statements(tree: ast.Module):
    """Module-level statements, looking inside top-level if/try blocks too (conditional definitions)."""
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.If, ast.Try)):
            blocks = [node.body, node.orelse] + ([h.body for h in node.handlers] if isinstance(node, ast.Try) else [])
            for block in reversed(blocks):
                stack.extend(reversed(block))
        else:
            yield node


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _module_symbols(module: str, depth: int = 0) -> tuple[list[str], bool] | None:
    """Names a module defines or re-exports, and whether it may create more at run time.

    `from x import *` is followed statically; a module `__getattr__` or an unreadable star source makes
    the module dynamic (only importing it can tell what it holds).
    """
    path = module_file(module)
    tree = _parse(path) if path else None
    if tree is None or depth > _MAX_DEPTH:
        return None
    names, dynamic = [], False
    for node in _top_level_statements(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.append(node.name)
            dynamic |= node.name == "__getattr__"
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            names.extend((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
            if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
                star = _module_symbols(_absolute(module, path, node), depth + 1)
                if star is None:
                    dynamic = True
                else:
                    names.extend(star[0])
                    dynamic |= star[1]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.extend(t.id for t in targets if isinstance(t, ast.Name))
    return names, dynamic


def module_names(module: str) -> list[str]:
    """Public names a module defines or re-exports (for 'did you mean' suggestions)."""
    symbols = _module_symbols(module)
    return [n for n in symbols[0] if not n.startswith("_")] if symbols else []


# ---------------------------------------------------------------- resolving a name to its definition


@dataclass(frozen=True)
class _Definition:
    node: ast.FunctionDef | ast.ClassDef
    module: str
    path: Path


def _find(module: str, name: str, depth: int = 0) -> _Definition | None:
    """The def/class that `module.name` refers to, following re-exports; None if it cannot be seen statically."""
    if depth > _MAX_DEPTH:
        return None
    path = module_file(module)
    tree = _parse(path) if path else None
    if tree is None:
        return None
    found: _Definition | None | str = None
    star_sources = []
    for node in _top_level_statements(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            found = _Definition(node, module, path)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    star_sources.append(_absolute(module, path, node))
                elif (alias.asname or alias.name) == name:
                    source = _absolute(module, path, node)
                    found = f"{source}.{alias.name}"
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            target = _dotted(node.value)
            found = f"{module}.{target}" if target and "." not in target else target
    if isinstance(found, str):
        return _find_dotted(found, depth + 1)
    for source in star_sources if found is None else ():
        found = _find(source, name, depth + 1)
        if found is not None:
            break
    return found


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def _find_dotted(path: str, depth: int = 0) -> _Definition | None:
    """Resolve `pkg.mod.Name` (the longest prefix that is a module file, then a name in it)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module, names = ".".join(parts[:cut]), parts[cut:]
        if module_file(module) is None:
            continue
        if len(names) != 1:
            return None  # nested attributes (Class.method) are not components we resolve statically
        return _find(module, names[0], depth)
    return None


def find_class(path: str) -> tuple[ast.ClassDef, str] | None:
    """The class statement `pkg.mod.Name` refers to and the module defining it, found statically."""
    defn = _find_dotted(path)
    if defn is None or not isinstance(defn.node, ast.ClassDef):
        return None
    return defn.node, defn.module


# ---------------------------------------------------------------- reading parameters


def _params_of_function(fn: ast.FunctionDef, skip_first: bool) -> tuple[list[Param], bool, bool]:
    args = fn.args
    positional = list(args.posonlyargs) + list(args.args)
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [
        Param(a.arg, d is None, typespec.from_ast(a.annotation), positional_only=i < len(args.posonlyargs))
        for i, (a, d) in enumerate(zip(positional, defaults))
    ]
    if skip_first and params:
        params = params[1:]
    params += [
        Param(a.arg, d is None, typespec.from_ast(a.annotation)) for a, d in zip(args.kwonlyargs, args.kw_defaults)
    ]
    return params, args.kwarg is not None, args.vararg is not None


def _is_dataclass(cls: ast.ClassDef) -> bool:
    return any((_dotted(d.func if isinstance(d, ast.Call) else d) or "").endswith("dataclass") for d in cls.decorator_list)


def _dataclass_fields(cls: ast.ClassDef) -> list[Param]:
    fields = []
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if "ClassVar" in ast.unparse(stmt.annotation):
                continue
            fields.append(Param(stmt.target.id, stmt.value is None, typespec.from_ast(stmt.annotation)))
    return fields


def _class_signature(defn: _Definition, depth: int) -> tuple[list[Param], bool, bool] | None:
    cls = defn.node
    for stmt in cls.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
            return _params_of_function(stmt, skip_first=True)
    if _is_dataclass(cls):
        return _dataclass_fields(cls), False, False
    for base in cls.bases:
        name = _dotted(base)
        if name is None:
            return None
        if name in ("object", "Generic", "Protocol", "ABC"):
            continue
        if name in ("nn.Module", "torch.nn.Module", "Module"):
            return [], False, False
        base_def = _find(defn.module, name, depth + 1) if "." not in name else _find_dotted(name, depth + 1)
        if base_def is None or not isinstance(base_def.node, ast.ClassDef):
            return None
        inherited = _class_signature(base_def, depth + 1)
        if inherited is None:
            return None
        return inherited
    return [], False, False


def _static_signature(path: str) -> Signature | None:
    defn = _find_dotted(path)
    if defn is None:
        return None
    if isinstance(defn.node, ast.FunctionDef):
        params, var_kw, var_pos = _params_of_function(defn.node, skip_first=False)
    else:
        read = _class_signature(defn, 0)
        if read is None:
            return None
        params, var_kw, var_pos = read
    return Signature(path, tuple(params), var_kw, var_pos)


def import_object(path: str):
    """Import `pkg.mod.Name` (or `pkg.mod.Class.attr`), raising UnknownComponent when it does not exist."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # this prefix is not a module; try a shorter one
            raise
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise UnknownComponent(path, _own_callables(module_name)) from None
        return obj
    raise UnknownComponent(path, [])


def _own_callables(module_name: str) -> list[str]:
    """Classes and functions a module offers from its own package (not `typing.Literal` and the like)."""
    module = importlib.import_module(module_name)
    package = module_name.split(".")[0]
    return [
        f"{module_name}.{name}"
        for name, value in vars(module).items()
        if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", "").split(".")[0] == package
    ]


def _runtime_signature(path: str) -> Signature:
    obj = import_object(path)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return Signature(path, (), True, True)  # a builtin without introspection: accept anything
    params, var_kw, var_pos = [], False, False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is p.VAR_POSITIONAL:
            var_pos = True
        else:
            params.append(
                Param(p.name, p.default is p.empty, typespec.from_runtime(p.annotation), p.kind is p.POSITIONAL_ONLY)
            )
    return Signature(path, tuple(params), var_kw, var_pos)


def missing_package(path: str) -> str | None:
    """Why `path` cannot exist when its top-level package is not installed (None when it is installed).

    Only the top module is looked up (`find_spec`, no import). A close installed name is suggested instead
    of `pip install` for a likely typo (`toch.optim.AdamW`).
    """
    top = path.split(".")[0]
    try:
        if not top.isidentifier() or importlib.util.find_spec(top) is not None:
            return None
    except (ImportError, ValueError):
        return None
    import pkgutil
    import sys

    from qattune.config.suggest import did_you_mean

    hint = did_you_mean(top, [*sys.builtin_module_names, *(m.name for m in pkgutil.iter_modules())])
    if hint:
        return f"unknown component '{path}': no package '{top}' is installed.{hint}"
    return f"package '{top}' is not installed (pip install {top})"


class ComponentImportError(ImportError):
    """The component's module exists but failed to import (a missing optional dependency, say)."""


@lru_cache(maxsize=None)
def component_signature(path: str) -> Signature:
    """The call signature of the component at `path`.

    Raises UnknownComponent if nothing is there, ComponentImportError if its module fails to import.
    """
    if "." not in path or not all(part.isidentifier() for part in path.split(".")):
        raise UnknownComponent(path, [])
    static = _static_signature(path)
    if static is not None:
        return static
    module, _, name = path.rpartition(".")
    symbols = _module_symbols(module)
    if symbols is not None and not symbols[1] and name not in symbols[0]:
        # The module's source is readable and cannot define the name: unknown, no import needed to say so.
        raise UnknownComponent(path, [f"{module}.{n}" for n in module_names(module)])
    try:
        return _runtime_signature(path)
    except UnknownComponent:
        raise
    except Exception as err:
        raise ComponentImportError(f"{type(err).__name__}: {err}") from err
