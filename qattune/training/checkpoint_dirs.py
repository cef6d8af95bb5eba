"""Checkpoint folders `output_dir/step_N`: atomic creation, listing, pruning, and `recipe_state.pt`."""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Optional

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


def begin_checkpoint(final_dir: str) -> str:
    """Make an empty `final_dir.tmp` to write a checkpoint into; `commit_checkpoint` publishes it."""
    tmp_dir = final_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    return tmp_dir


def commit_checkpoint(tmp_dir: str, final_dir: str) -> None:
    """Rename the finished `tmp_dir` to `final_dir` (replacing an older one of the same name), so a
    crash mid-save leaves only a `.tmp` folder, never a checkpoint that looks complete."""
    if os.path.isdir(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def prune_step_dirs(output_dir: str, keep_last_n: int) -> list[str]:
    """Delete all but the newest `keep_last_n` checkpoints; returns the deleted paths."""
    if keep_last_n < 1:
        raise QattuneError(f"keep_last_n_checkpoints must be at least 1, got {keep_last_n}")
    doomed = [path for _, path in list_step_dirs(output_dir)[:-keep_last_n]]
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
