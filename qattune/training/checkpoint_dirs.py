"""Checkpoint folders `output_dir/step_N`: atomic creation, listing, pruning, `recipe_state.pt`, the one-line
error of a save the disk refused, and the lock that keeps a second run out of a run's output folder."""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shutil
import socket
from typing import IO, Any, Callable, Optional

import torch

from qattune.checkpoint.atomic import hidden_sibling, leftovers, publish_directory
from qattune.errors import QattuneError

log = logging.getLogger(__name__)

RECIPE_STATE_FILE = "recipe_state.pt"
LOCK_FILE = ".qattune.lock"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def list_step_dirs(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `output_dir` as (step, path), oldest first (`.tmp` folders excluded)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete `step_N` folder under `output_dir` that holds recipe state, or None."""
    for _, path in reversed(list_step_dirs(output_dir)):
        if os.path.isfile(os.path.join(path, RECIPE_STATE_FILE)):
            return path
    return None


def _deleting_leftovers(output_dir: str) -> list[str]:
    """Hidden `.step_N.deleting-*` folders a pruning killed mid-delete left (see `_delete_step_dir`)."""
    return glob.glob(os.path.join(glob.escape(output_dir), ".step_*.deleting-*"))


def _partial_saves(final_dir: str) -> list[str]:
    """What an interrupted or failed save of `final_dir` may have written: its `.tmp` folder and the
    hidden folders `atomic_directory` makes beside that."""
    tmp_dir = final_dir + ".tmp"
    return [tmp_dir, *map(str, leftovers(tmp_dir))]


def begin_checkpoint(final_dir: str) -> str:
    """Make an empty `final_dir.tmp` to write a checkpoint into; `commit_checkpoint` publishes it. What an
    interrupted earlier save of the same step, or an interrupted pruning, left behind is removed first
    (the run holds the output folder, see `lock_output_dir`)."""
    replaced = map(str, leftovers(final_dir))
    for path in [*_partial_saves(final_dir), *replaced, *_deleting_leftovers(os.path.dirname(final_dir))]:
        shutil.rmtree(path, ignore_errors=True)
    tmp_dir = final_dir + ".tmp"
    os.makedirs(tmp_dir)
    return tmp_dir


def abandon_checkpoint(final_dir: str) -> None:
    """Remove what a failed save of `final_dir` wrote (an earlier complete `final_dir`, or the `.old` copy
    a commit moved it to, stays)."""
    for partial in _partial_saves(final_dir):
        shutil.rmtree(partial, ignore_errors=True)


def commit_checkpoint(tmp_dir: str, final_dir: str) -> None:
    """Publish the finished `tmp_dir` as `final_dir` in one rename, its files synced to disk first, so a
    crash mid-save leaves only a `.tmp` folder, never a checkpoint that looks complete; an older
    `final_dir` is replaced only once the new one is in place (see `publish_directory`)."""
    publish_directory(tmp_dir, final_dir)


def _delete_step_dir(path: str) -> None:
    """Delete a checkpoint so that it never looks half there: renamed to a hidden `.step_N.deleting-*`
    first (one atomic step), then removed; a kill mid-delete leaves only the hidden folder."""
    doomed = hidden_sibling(path, "deleting")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_step_dirs(output_dir: str, keep_last_n: int,
                    prunable: Callable[[int], bool] = lambda step: True) -> list[str]:
    """Delete all but the newest `keep_last_n` of the checkpoints whose step is `prunable` (a run prunes
    only its own line of checkpoints, never another run's in the same folder); returns the deleted paths."""
    if keep_last_n < 1:
        raise QattuneError(f"keep_last_n_checkpoints must be at least 1, got {keep_last_n}")
    doomed = [path for step, path in list_step_dirs(output_dir) if prunable(step)][:-keep_last_n]
    for path in doomed:
        _delete_step_dir(path)
    return doomed


_ADVICE = {errno.ENOSPC: "free space", errno.EDQUOT: "free space (or raise the disk quota)",
           errno.EFBIG: "raise the file-size limit (ulimit -f)"}
_RUST_IO_ERROR = re.compile(r"(?:\(os error |Os \{ code: )(\d+)")  # how safetensors reports an OS error


def _os_error(err: BaseException) -> Optional[tuple[int, str]]:
    """(errno, its text) of the OS error behind `err`, looking through chained exceptions (torch.save
    raises "unexpected pos" while handling the OSError) and safetensors' messages; None if there is none."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno, seen.strerror or os.strerror(seen.errno)
        found = _RUST_IO_ERROR.search(str(seen))
        if found:
            return int(found.group(1)), os.strerror(int(found.group(1)))
        seen = seen.__cause__ or seen.__context__
    return None


def _free_space(folder: str) -> str:
    """"; N MB free" on `folder`'s disk ("" where that cannot be read)."""
    try:
        return f"; {shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        return ""


def save_failure(final_dir: str, err: BaseException) -> Optional[QattuneError]:
    """The one line for a save of `final_dir` that the OS refused (disk full, file too large, ...): what
    failed, which checkpoint is intact, what to do; None when `err` is not such a failure."""
    found = _os_error(err)
    if found is None:
        return None
    code, reason = found
    output_dir, name = os.path.split(final_dir)
    advice = _ADVICE.get(code, "fix that")
    intact = latest_checkpoint(output_dir)
    after = (f"{os.path.basename(intact)} is intact; {advice}, then resume with resume_from_checkpoint=true"
             if intact else f"no earlier checkpoint is complete; {advice}, then run again")
    return QattuneError(f"could not write checkpoint {name} in {output_dir} ({reason}{_free_space(output_dir)}): "
                        f"{after}")


class OutputDirLock:
    """A run's claim on its output folder: an exclusive flock on `output_dir/.qattune.lock`, held until
    `release()` (or the end of the `with` block, or of the process: the OS drops it if the run dies)."""

    def __init__(self, handle: Optional[IO[str]]) -> None:
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()  # closing the only descriptor drops the flock

    def __enter__(self) -> "OutputDirLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output_dir(output_dir: str) -> OutputDirLock:
    """Claim `output_dir` for this run (call it on the process that writes the checkpoints, global rank 0,
    and hold it for the run's life), so two runs never write into one folder; one line naming the other
    run's pid if it is taken. Where the file system has no locks, a warning and an unlocked claim."""
    import fcntl

    path = os.path.join(output_dir, LOCK_FILE)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "not yet recorded"
        handle.close()
        raise QattuneError(f"output_dir {output_dir} is in use by another qattune run (pid {holder}); wait for it "
                           "to finish, or set output_dir to another folder") from None
    except OSError as err:
        handle.close()
        log.warning("output_dir %s cannot be locked (%s): nothing stops a second run from writing into it",
                    output_dir, err.strerror)
        return OutputDirLock(None)
    handle.truncate(0)
    handle.write(f"{os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return OutputDirLock(handle)


def save_recipe_state(directory: str, state: dict[str, Any]) -> str:
    """Write `recipe_state.pt` via a temporary file, fsync'ed, renamed into place."""
    path = os.path.join(directory, RECIPE_STATE_FILE)
    partial = path + ".partial"
    with open(partial, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def load_recipe_state(checkpoint_dir: str) -> dict[str, Any]:
    """Read `recipe_state.pt` from a checkpoint folder, or say clearly why it cannot be resumed."""
    if not os.path.isdir(checkpoint_dir):
        raise QattuneError(f"resume_from_checkpoint '{checkpoint_dir}' is not a folder; point it at an output_dir/step_N folder")
    path = os.path.join(checkpoint_dir, RECIPE_STATE_FILE)
    if not os.path.isfile(path):
        raise QattuneError(
            f"resume_from_checkpoint '{checkpoint_dir}' has no {RECIPE_STATE_FILE}; point it at an "
            "output_dir/step_N folder written by a qattune training run"
        )
    try:
        # mmap: under torchrun every rank reads the file, and only the parts it restores are paged in
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise QattuneError(f"'{path}' could not be read as qattune recipe state ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                           "the file is damaged or was not written by qattune") from err
