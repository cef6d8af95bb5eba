"""Atomic checkpoint directories: everything is written under a hidden temporary name, then renamed.

A crash (or an exception) mid-save leaves at most a hidden `.NAME.tmp-PID-*` folder, never a directory that
looks like a complete checkpoint; the next save of NAME removes such folders once their process is gone.
An existing checkpoint of the same name is replaced only once the new one is complete and on disk.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_OWNER_PID = re.compile(r"\.(?:tmp|old)-(\d+)-[^-]*$")


def hidden_sibling(final: str | os.PathLike, kind: str) -> Path:
    """A fresh hidden name beside `final`, `.NAME.KIND-PID-RANDOM`, naming the process that made it."""
    final = Path(final)
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def leftovers(final: str | os.PathLike) -> list[Path]:
    """What interrupted saves of `final` left beside it: partial `.NAME.tmp-*` and replaced `.NAME.old-*`."""
    parent, name = (glob.escape(part) for part in os.path.split(os.fspath(final)))
    return [Path(found) for kind in ("tmp", "old") for found in glob.glob(os.path.join(parent, f".{name}.{kind}-*"))]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_dead_leftovers(final: str | os.PathLike) -> None:
    """Clear the leftovers (see `leftovers`) of saves of `final` whose process is gone; a live process's
    are kept. An `.old` copy is put back as `final` if a save died between its two renames, else removed."""
    final = Path(final)
    for leftover in leftovers(final):
        owner = _OWNER_PID.search(leftover.name)
        if owner is None or _process_alive(int(owner.group(1))):
            continue
        if leftover.name.startswith(f".{final.name}.old-") and not final.exists():
            os.replace(leftover, final)
        else:
            _remove(leftover)


def _remove(path: Path) -> None:
    """Delete a folder or a file, whatever is still there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root`, and `root` itself, to disk."""
    for path in root.rglob("*"):
        if not path.is_symlink() and (path.is_file() or path.is_dir()):
            _fsync_path(path)
    _fsync_path(root)


def readable_as_umask_allows(root: str | os.PathLike) -> None:
    """Give every file under `root` the permissions the umask allows (safetensors writes its files
    0600, so another user or a serving container could not read the weights)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)


def publish_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the finished folder `tmp` `final` in one rename, durably: its contents are synced before, the
    parent folder after. An existing `final` is moved aside first and deleted only once the new one is in
    place, so a crash at any point keeps one complete `final` (or its `.old` copy, see `remove_dead_leftovers`)."""
    tmp, final = Path(tmp), Path(final)
    readable_as_umask_allows(tmp)
    _fsync_tree(tmp)
    if final.exists():
        old = hidden_sibling(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(final.parent)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it becomes `final` in one rename.
    What killed earlier saves of `final` left is cleared first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(final)
    tmp = hidden_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        publish_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a synced temporary file renamed into place: a reader (or a crash)
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(path)
    partial = hidden_sibling(path, "tmp")
    try:
        with open(partial, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


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
