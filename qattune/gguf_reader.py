"""One parsed GGUF file per file version: `gguf.GGUFReader` takes seconds on a real model (it walks every
metadata field and tensor header), and a run reads the same file for its tokenizer, its config and its
weights."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Union


def open_gguf(path: Union[str, os.PathLike]) -> Any:
    """The `gguf.GGUFReader` of the file at `path`, shared until the file changes (gguf's own errors
    propagate; nothing is cached for a file it cannot read)."""
    file = Path(path).resolve()
    stat = file.stat()
    return _reader(str(file), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int) -> Any:
    import gguf

    return gguf.GGUFReader(path)
