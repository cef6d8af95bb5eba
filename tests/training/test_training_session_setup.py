"""What the training session builds before any weight is read: the loss (torchtune's older
torch.nn.CrossEntropyLoss mapped), the seed (null draws one), the validation set (only when validating)."""

import re

import pytest
import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.training import CrossEntropyLoss, DistillationLoss
from qattune.training.session import _seed, build_loss


class OneProcess:
    is_main = True


def test_torchs_cross_entropy_trains_as_qattunes_token_weighted_loss():
    loss = build_loss({"_component_": "torch.nn.CrossEntropyLoss"})
    assert type(loss) is CrossEntropyLoss and loss.ignore_index == -100
    logits, labels = torch.randn(2, 5, 11), torch.tensor([[1, 2, -100, 4, 5], [6, -100, -100, 9, 10]])
    mean = nn.CrossEntropyLoss()(logits.reshape(-1, 11), labels.reshape(-1))
    assert torch.allclose(loss(logits, labels) / (labels != -100).sum(), mean)
    assert type(build_loss(None)) is CrossEntropyLoss
    assert type(build_loss({"_component_": "qattune.training.DistillationLoss"})) is DistillationLoss


@pytest.mark.parametrize("node, message", [
    ({"_component_": "torch.nn.CrossEntropyLoss", "label_smoothing": 0.1},
     "loss torch.nn.CrossEntropyLoss with label_smoothing set: qattune's token-weighted loss has no such option; "
     "use loss._component_=qattune.training.CrossEntropyLoss without label_smoothing"),
    ({"_component_": "torch.nn.CrossEntropyLoss", "reduction": "none"},
     "loss torch.nn.CrossEntropyLoss with reduction set: qattune's token-weighted loss has no such option; "
     "use loss._component_=qattune.training.CrossEntropyLoss without reduction"),
    ({"_component_": "torch.nn.NLLLoss"},
     "loss NLLLoss uses reduction='mean'; the trainer weights tokens itself and needs a summed loss: use "
     "qattune.training.CrossEntropyLoss"),
])
def test_losses_qattune_cannot_train_with_are_refused_before_the_model_loads(node, message):
    with pytest.raises(QattuneError) as err:
        build_loss(node)
    assert str(err.value) == message


def test_a_null_seed_draws_one_and_says_which(capsys):
    assert _seed(7, OneProcess()) == 7 and capsys.readouterr().out == ""
    drawn = {_seed(None, OneProcess()) for _ in range(3)}
    printed = re.findall(r"seed=null: this run draws seed (\d+) \(set seed=(\d+) to repeat it\)", capsys.readouterr().out)
    assert {int(a) for a, b in printed if a == b} == drawn and len(drawn) > 1


def test_resume_takes_the_newest_step_with_recipe_state(tmp_path, caplog):
    from qattune.training.session import TrainingSession

    for step in (2, 4, 6):
        (tmp_path / f"step_{step}").mkdir()
    for step in (2, 4):
        (tmp_path / f"step_{step}" / "recipe_state.pt").write_bytes(b"")
    session = TrainingSession.__new__(TrainingSession)  # only what _resume_dir reads
    session.cfg, session.output_dir, session.dist = {"resume_from_checkpoint": True}, str(tmp_path), OneProcess()
    with caplog.at_level("WARNING"):
        assert session._resume_dir() == str(tmp_path / "step_4")
    assert "step_6 has no recipe_state.pt to resume from: resuming from step_4" in caplog.text
    for step in (2, 4):
        (tmp_path / f"step_{step}" / "recipe_state.pt").unlink()
    with pytest.raises(QattuneError, match="holds no complete step_N checkpoint \\(with recipe_state.pt\\)"):
        session._resume_dir()


def test_a_profiler_schedule_longer_than_the_run_is_warned_about(tmp_path, caplog):
    from qattune.training.profiler import setup_profiler
    from qattune.training.session import _warn_profiler_never_traces

    with caplog.at_level("WARNING"):
        _warn_profiler_never_traces(setup_profiler(enabled=False), 1)
        _warn_profiler_never_traces(setup_profiler(True, str(tmp_path), 5, 3, 2), 10)
        assert not caplog.records
        _warn_profiler_never_traces(setup_profiler(True, str(tmp_path), 5, 3, 2), 9)
    assert caplog.records[0].getMessage() == (
        "the profiler's schedule (wait + warmup + active steps) needs 10 steps, but the run has 9: it writes no "
        "trace; lower profiler.wait_steps, warmup_steps or active_steps")


def test_a_checkpoint_of_another_process_count_names_nodes_and_processes():
    from training_harness import build_trainer
    from training_toys import learnable_dataset

    trainer = build_trainer(learnable_dataset(8), batch_size=2, save_model=None)
    with pytest.raises(QattuneError) as err:
        trainer._check_resumable("out/step_2", {"world_size": 2})
    assert str(err.value) == ("checkpoint 'out/step_2' was written with world_size=2, this run has world_size=1; "
                              "resume with the same number of processes (--nnodes x --nproc_per_node)")


def test_a_second_run_into_the_same_output_dir_stops_at_once(tmp_path):
    from qattune.training.checkpoint_dirs import lock_output_dir
    from qattune.training.session import _lock_output_dir

    held = lock_output_dir(str(tmp_path))
    try:
        with pytest.raises(QattuneError, match=f"output_dir {tmp_path} is in use by another qattune run"):
            _lock_output_dir(str(tmp_path), OneProcess())
    finally:
        held.release()
    _lock_output_dir(str(tmp_path), OneProcess()).release()
