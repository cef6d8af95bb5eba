"""Locating tokenizer files, with errors that say what was expected where."""

from __future__ import annotations

from pathlib import Path

from qattune.errors import QattuneError


def require_file(path: str, what: str) -> Path:
    """`path` as a Path, or a QattuneError naming the kind of file that was expected there."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise QattuneError(f"{path} is a directory; give the path of the {what} itself")
    if not file.is_file():
        raise QattuneError(f"{what} not found: {path} (check the tokenizer path in your config)")
    return file
