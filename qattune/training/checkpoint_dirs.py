"""Checkpoint folders `output_dir/step_N`: atomic creation, listing, pruning, and `recipe_state.pt`."""

from __future__ import annotations

import glob
import os
import re
import shutil
import uuid
from typing import Any, Callable, Optional

import torch

from qattune.errors import QattuneError

RECIPE_STATE_FILE = "recipe_state.pt"
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


def _leftovers(path: str) -> list[str]:
    """Hidden folders an interrupted save of `path` may have left beside it (see `atomic_directory`)."""
    parent, name = (glob.escape(part) for part in os.path.split(path))
    return [found for kind in ("tmp", "old") for found in glob.glob(os.path.join(parent, f".{name}.{kind}-*"))]


def begin_checkpoint(final_dir: str) -> str:
    """Make an empty `final_dir.tmp` to write a checkpoint into; `commit_checkpoint` publishes it. What an
    interrupted earlier save of the same step left behind is removed first."""
    tmp_dir = final_dir + ".tmp"
    for stale in [tmp_dir, *_leftovers(tmp_dir), *_leftovers(final_dir)]:
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp_dir)
    return tmp_dir


def commit_checkpoint(tmp_dir: str, final_dir: str) -> None:
    """Rename the finished `tmp_dir` to `final_dir`, so a crash mid-save leaves only a `.tmp` folder, never
    a checkpoint that looks complete. An older `final_dir` is renamed aside first and deleted only once
    the new one is in place, so a crash at any point keeps one complete checkpoint of that step."""
    from qattune.checkpoint.atomic import readable_as_umask_allows

    readable_as_umask_allows(tmp_dir)
    if not os.path.isdir(final_dir):
        os.replace(tmp_dir, final_dir)
        return
    parent, name = os.path.split(final_dir)
    old = os.path.join(parent, f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


def prune_step_dirs(output_dir: str, keep_last_n: int,
                    prunable: Callable[[int], bool] = lambda step: True) -> list[str]:
    """Delete all but the newest `keep_last_n` of the checkpoints whose step is `prunable` (a run prunes
    only its own line of checkpoints, never another run's in the same folder); returns the deleted paths."""
    if keep_last_n < 1:
        raise QattuneError(f"keep_last_n_checkpoints must be at least 1, got {keep_last_n}")
    doomed = [path for step, path in list_step_dirs(output_dir) if prunable(step)][:-keep_last_n]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


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
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise QattuneError(f"'{path}' could not be read as qattune recipe state ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                           "the file is damaged or was not written by qattune") from err
