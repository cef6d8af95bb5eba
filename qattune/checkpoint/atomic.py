"""Atomic checkpoint directories: everything is written under a hidden temporary name, then renamed.

A crash (or an exception) mid-save leaves at most a hidden `.NAME.tmp-*` folder, never a directory that
looks like a complete checkpoint. An existing checkpoint of the same name is replaced only once the new
one is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def readable_as_umask_allows(root: str | os.PathLike) -> None:
    """Give every file under `root` the permissions the umask allows (safetensors writes its files
    0600, so another user or a serving container could not read the weights)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it becomes `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        readable_as_umask_allows(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{tag}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def writable_directory(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """`path` as an absolute folder that exists and takes new files, checked before a run does any heavy
    work (so a typo fails in a second, not after training); one line naming `key` otherwise."""
    folder = Path(path).expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".qattune-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        from qattune.errors import QattuneError

        reason = err.strerror or type(err).__name__
        raise QattuneError(f"{key}={path} cannot be written ({reason}: {err.filename or folder}); "
                           f"set {key} to a folder you can write") from err
    return folder
