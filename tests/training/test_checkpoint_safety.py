"""Checkpoint safety: one run per output folder (lock), pruning and saving that a kill or a full disk
never turns into a checkpoint that looks complete, synced commits, leftovers of killed saves, and a
checkpoint at the end of every epoch that resumes exactly."""

import errno
import os
import signal
import subprocess
import sys
import types

import pytest
import torch
import torch.multiprocessing as mp
from training_harness import build_trainer
from training_toys import learnable_dataset, make_model

from qattune.checkpoint import atomic
from qattune.checkpoint.atomic import atomic_directory
from qattune.errors import QattuneError
from qattune.training import checkpoint_dirs as ckpt
from qattune.training import destroy_distributed, init_distributed
from qattune.training.checkpoint_dirs import lock_output_dir

HOST = __import__("socket").gethostname()


def _busy_line(folder, pid) -> str:
    return (f"output_dir {folder} is in use by another qattune run (pid {pid} on {HOST}); wait for it to finish, "
            "or set output_dir to another folder")


# ----- one run per output folder -------------------------------------------------------------------
def test_a_second_lock_on_an_output_dir_is_one_line_naming_the_holder(tmp_path):
    with lock_output_dir(str(tmp_path)):
        with pytest.raises(QattuneError) as err:
            lock_output_dir(str(tmp_path))
        assert str(err.value) == _busy_line(tmp_path, os.getpid())
    lock = lock_output_dir(str(tmp_path))  # released at the end of the block: free again
    lock.release()
    lock.release()  # twice is harmless
    assert os.listdir(tmp_path) == [ckpt.LOCK_FILE]  # hidden, and no step_N
    assert ckpt.list_step_dirs(str(tmp_path)) == []


def test_the_os_releases_the_lock_of_a_killed_run(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from qattune.training.checkpoint_dirs import lock_output_dir; "
                               f"lock = lock_output_dir({str(tmp_path)!r}); print('locked', flush=True); "
                               "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(QattuneError) as err:
            lock_output_dir(str(tmp_path))
        assert str(err.value) == _busy_line(tmp_path, holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_output_dir(str(tmp_path)).release()


# ----- pruning --------------------------------------------------------------------------------------
def test_a_kill_while_pruning_leaves_no_step_dir_that_looks_complete(tmp_path, monkeypatch):
    for step in (2, 4):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "config.json").write_text("{}")
        (tmp_path / f"step_{step}" / "model.safetensors").write_text("w")

    def killed_mid_delete(path, **kwargs):  # the first file is gone, then the process dies
        os.remove(os.path.join(path, "model.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_step_dirs(str(tmp_path), 1)
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0].startswith(".step_2.deleting-") and names[1:] == ["step_4"]
    assert [step for step, _ in ckpt.list_step_dirs(str(tmp_path))] == [4]
    ckpt.begin_checkpoint(str(tmp_path / "step_6"))  # the next save clears what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_6.tmp"]


# ----- durable commits ------------------------------------------------------------------------------
def test_commit_syncs_every_file_and_folder_and_the_parent(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(atomic, "_fsync_path", lambda path: synced.append(os.path.relpath(path, tmp_path)))
    tmp = ckpt.begin_checkpoint(str(tmp_path / "step_2"))
    for name in ("model.safetensors", "config.json", "recipe_state.pt"):
        (tmp_path / "step_2.tmp" / name).write_text(name)
    (tmp_path / "step_2.tmp" / "tokenizer").mkdir()
    (tmp_path / "step_2.tmp" / "tokenizer" / "vocab.json").write_text("{}")
    ckpt.commit_checkpoint(tmp, str(tmp_path / "step_2"))
    inside = [os.path.join("step_2.tmp", name) for name in
              ("config.json", "model.safetensors", "recipe_state.pt", "tokenizer", "tokenizer/vocab.json")]
    assert sorted(synced[:-2]) == inside and synced[-2:] == ["step_2.tmp", "."]  # contents, folder, then parent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]


# ----- a save the disk refuses ----------------------------------------------------------------------
def _little_free_space(monkeypatch):
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=200_000))


def _failing_model_saver(fail_at_step, error):
    def save_model(directory, step):
        with open(os.path.join(directory, "model.safetensors"), "wb") as handle:
            handle.write(b"part of the weights")
        if step == fail_at_step:
            raise error

    return save_model


def _torch_save_error() -> RuntimeError:
    """What torch.save raises when the disk fills: an unhelpful RuntimeError, raised while handling the OSError."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 942784 vs 942676")
        except RuntimeError as err:
            return err


def test_a_full_disk_while_saving_removes_the_partial_folder_and_names_the_intact_checkpoint(tmp_path, monkeypatch):
    _little_free_space(monkeypatch)
    real_save_state = ckpt.save_recipe_state

    def full_disk_at_step_4(directory, state):
        if state["global_step"] == 4:
            open(os.path.join(directory, "recipe_state.pt.partial"), "wb").close()
            raise _torch_save_error()
        return real_save_state(directory, state)

    monkeypatch.setattr(ckpt, "save_recipe_state", full_disk_at_step_4)
    trainer = build_trainer(learnable_dataset(16), batch_size=2, output_dir=str(tmp_path), save_every_n_steps=2,
                            save_model=_failing_model_saver(None, None))
    with pytest.raises(QattuneError) as err:
        trainer.fit()
    assert str(err.value) == (f"could not write checkpoint step_4 in {tmp_path} (No space left on device; 0.2 MB "
                              "free): step_2 is intact; free space, then resume with resume_from_checkpoint=true")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]
    assert trainer.last_saved_step == 2


def test_a_file_size_limit_at_the_first_save_says_no_checkpoint_is_complete(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    _little_free_space(monkeypatch)
    too_large = SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    trainer = build_trainer(learnable_dataset(16), batch_size=2, output_dir=str(tmp_path), save_every_n_steps=2,
                            save_model=_failing_model_saver(2, too_large))
    with pytest.raises(QattuneError) as err:
        trainer.fit()
    assert str(err.value) == (f"could not write checkpoint step_2 in {tmp_path} (File too large; 0.2 MB free): no "
                              "earlier checkpoint is complete; raise the file-size limit (ulimit -f), then run again")
    assert os.listdir(tmp_path) == []


def test_a_save_that_fails_for_another_reason_keeps_its_error_and_removes_the_partial_folder(tmp_path):
    trainer = build_trainer(learnable_dataset(16), batch_size=2, output_dir=str(tmp_path), save_every_n_steps=2,
                            save_model=_failing_model_saver(2, ValueError("a bug")))
    with pytest.raises(ValueError, match="^a bug$"):
        trainer.fit()
    assert os.listdir(tmp_path) == []


def _full_disk_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed("cpu")
    full = OSError(errno.ENOSPC, "No space left on device")
    saver = _failing_model_saver(4, full) if rank == 0 else (lambda directory, step: None)  # rank 0 writes
    trainer = build_trainer(learnable_dataset(16), batch_size=2, output_dir=out_dir, save_every_n_steps=2,
                            save_model=saver)
    try:
        trainer.fit()
        outcome = "finished"
    except QattuneError as err:
        outcome = str(err)
    finally:
        destroy_distributed()
    with open(os.path.join(os.path.dirname(out_dir), f"rank{rank}.txt"), "w") as handle:
        handle.write(outcome)


def test_under_torchrun_every_rank_stops_with_rank0s_line(tmp_path):
    from test_training_distributed import _free_port

    mp.spawn(_full_disk_worker, args=(2, _free_port(), str(tmp_path / "out")), nprocs=2, join=True)
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"could not write checkpoint step_4 in {tmp_path / 'out'} (No space left on device; ")
    assert lines[0].endswith(" MB free): step_2 is intact; free space, then resume with resume_from_checkpoint=true")
    assert sorted(os.listdir(tmp_path / "out")) == ["step_2"]


# ----- leftovers of killed saves (quantize, atomic_directory) ----------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_a_new_save_clears_what_killed_saves_left_but_not_a_live_ones(tmp_path):
    dead = _dead_pid()
    killed = tmp_path / f".quantized.tmp-{dead}-0badf00d"
    live = tmp_path / f".quantized.tmp-{os.getpid()}-1badf00d"
    other = tmp_path / f".other.tmp-{dead}-2badf00d"  # another output's: not ours to judge
    for folder in (killed, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_text("part")
    with atomic_directory(tmp_path / "quantized") as tmp:
        (tmp / "model.safetensors").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "quantized"])
    assert (tmp_path / "quantized" / "model.safetensors").read_text() == "whole"


def test_a_save_killed_between_its_renames_gets_its_old_output_back(tmp_path):
    old = tmp_path / f".quantized.old-{_dead_pid()}-0badf00d"  # moved aside; the new one never took its place
    old.mkdir()
    (old / "model.safetensors").write_text("old")
    atomic.remove_dead_leftovers(tmp_path / "quantized")
    assert [p.name for p in tmp_path.iterdir()] == ["quantized"]
    assert (tmp_path / "quantized" / "model.safetensors").read_text() == "old"


# ----- a checkpoint at the end of every epoch ---------------------------------------------------------
def _epochs_setup(output_dir, **kwargs):
    return dict(batch_size=2, epochs=3, max_steps_per_epoch=3, dropout=0.1, output_dir=str(output_dir), **kwargs)


def test_every_epoch_ends_with_a_checkpoint_that_resumes_exactly(tmp_path):
    dataset = learnable_dataset(16)
    straight = build_trainer(dataset, **_epochs_setup(tmp_path / "straight")).fit()
    assert sorted(os.listdir(tmp_path / "straight")) == ["step_3", "step_6", "step_9"]
    for step in (3, 6):
        model = make_model(seed=123, dropout=0.1)  # different init: everything must come from the checkpoint
        model.load_state_dict(torch.load(tmp_path / "straight" / f"step_{step}" / "model.pt"))
        trainer = build_trainer(dataset, model=model, **_epochs_setup(tmp_path / f"again_{step}"))
        trainer.load_checkpoint(str(tmp_path / "straight" / f"step_{step}"))
        assert trainer.fit() == straight[step:]
        later = [f"step_{later}" for later in (6, 9) if later > step]  # the resumed step is not saved again
        assert sorted(os.listdir(tmp_path / f"again_{step}")) == later


def test_an_epoch_end_just_saved_is_not_saved_again(tmp_path, monkeypatch):
    trainer = build_trainer(learnable_dataset(16), **_epochs_setup(tmp_path, save_every_n_steps=3))
    saved = []
    real_save = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda: saved.append(trainer.global_step) or real_save())
    trainer.fit()
    assert saved == [3, 6, 9]

