"""The training loop: learning, token-weighted accumulation, exact resume, QAT hook state, checkpoints."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from training_harness import build_trainer, model_saver
from training_toys import RecordingQuantizer, StateProbe, learnable_dataset, make_model

from qattune.data import IGNORE_INDEX, padded_collate
from qattune.errors import QattuneError
from qattune.training import FakeQuantAfterNSteps, JSONLLogger, latest_checkpoint, list_step_dirs


def test_loss_goes_down_on_a_learnable_task():
    trainer = build_trainer(learnable_dataset(32), batch_size=8, epochs=4, lr=1e-2)
    losses = trainer.fit()
    assert len(losses) == 16
    assert losses[0] > 3.0  # about ln(32) at init
    assert sum(losses[-4:]) / 4 < 0.35 * losses[0]


def test_first_step_loss_is_the_token_weighted_mean():
    dataset = learnable_dataset(8)
    model = make_model()
    batch = padded_collate([dataset[i] for i in range(4)])
    with torch.no_grad():
        logits = model(batch["tokens"])
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none")
    trained = batch["labels"].reshape(-1) != IGNORE_INDEX
    expected = (per_token[trained].sum() / trained.sum()).item()
    trainer = build_trainer(dataset, model=model, batch_size=1, accum=4, shuffle=False, max_steps_per_epoch=1)
    assert trainer.fit()[0] == pytest.approx(expected, abs=1e-6)


def test_grad_accumulation_4x1_equals_1x4():
    dataset = learnable_dataset(16)
    one_big = build_trainer(dataset, batch_size=4, accum=1, shuffle=False, lr=1e-3).fit()
    four_small = build_trainer(dataset, batch_size=1, accum=4, shuffle=False, lr=1e-3).fit()
    assert len(one_big) == len(four_small) == 4
    # micro-batches hold different numbers of trained tokens, so a mean of means would differ
    assert max(abs(a - b) for a, b in zip(one_big, four_small)) < 1e-6


def _resume_setup(tmp_path, **kwargs):
    return dict(
        batch_size=2, accum=2, epochs=2, max_steps_per_epoch=4, dropout=0.1, output_dir=str(tmp_path), **kwargs
    )


def test_resume_gives_identical_losses(tmp_path):
    dataset = learnable_dataset(24)
    straight = build_trainer(dataset, save_every_n_steps=2, **_resume_setup(tmp_path)).fit()
    assert len(straight) == 8
    names = sorted(os.listdir(tmp_path))
    assert names == ["step_2", "step_4", "step_6", "step_8"]
    for step in (4, 6):  # 4: at the epoch boundary; 6: in the middle of epoch 2
        model = make_model(seed=123, dropout=0.1)  # different init: everything must come from the checkpoint
        model.load_state_dict(torch.load(tmp_path / f"step_{step}" / "model.pt"))
        trainer = build_trainer(dataset, model=model, **_resume_setup(tmp_path / f"again_{step}"))
        trainer.load_checkpoint(str(tmp_path / f"step_{step}"))
        assert trainer.global_step == step
        resumed = trainer.fit()
        assert resumed == straight[step:]


def test_qat_hook_state_before_and_after_n_including_resume(tmp_path):
    dataset = learnable_dataset(16)

    def run(model, resume_from=None):
        quantizer = RecordingQuantizer()
        probe = StateProbe(model)
        hooks = [FakeQuantAfterNSteps(quantizer, model, after_n_steps=3), probe]
        trainer = build_trainer(
            dataset, model=model, batch_size=2, output_dir=str(tmp_path), save_every_n_steps=1, step_hooks=hooks,
            max_steps_per_epoch=6,
        )
        if resume_from is not None:
            trainer.load_checkpoint(str(tmp_path / resume_from))
        trainer.fit()
        return probe.seen, quantizer.calls

    seen, calls = run(make_model())
    assert seen == [(0, False), (1, False), (2, False), (3, True), (4, True), (5, True)]
    assert calls == [False, True]  # applied once at the start, then only on the change
    model = make_model()
    model.fake_quant_enabled = True  # a wrong state left over must be corrected from the step
    seen, _ = run(model, resume_from="step_2")
    assert seen == [(2, False), (3, True), (4, True), (5, True)]
    seen, _ = run(make_model(), resume_from="step_4")
    assert seen == [(4, True), (5, True)]


def test_checkpoints_are_pruned_and_complete(tmp_path):
    trainer = build_trainer(
        learnable_dataset(16), batch_size=2, output_dir=str(tmp_path), save_every_n_steps=2, keep_last_n_checkpoints=2
    )
    trainer.fit()
    assert sorted(os.listdir(tmp_path)) == ["step_6", "step_8"]
    for name in ("step_6", "step_8"):
        assert sorted(os.listdir(tmp_path / name)) == ["model.pt", "recipe_state.pt"]
    (tmp_path / "step_9.tmp").mkdir()  # an interrupted save is never taken for a checkpoint
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_8")
    assert [step for step, _ in list_step_dirs(str(tmp_path))] == [6, 8]
    state = torch.load(tmp_path / "step_8" / "recipe_state.pt", weights_only=True)
    assert state["global_step"] == 8 and state["data"]["batches_done"] == 8 and state["world_size"] == 1


def test_resume_without_recipe_state_is_one_clear_line(tmp_path):
    (tmp_path / "step_3").mkdir()
    trainer = build_trainer(learnable_dataset(8))
    with pytest.raises(QattuneError) as err:
        trainer.load_checkpoint(str(tmp_path / "step_3"))
    assert "has no recipe_state.pt" in str(err.value) and "\n" not in str(err.value)


def test_validation_loss_and_logged_metrics(tmp_path):
    train, val = learnable_dataset(16), learnable_dataset(6, seed=9)
    from qattune.data import StatefulDataLoader

    val_loader = StatefulDataLoader(val, 4, padded_collate, shuffle=False, drop_last=False)
    logger = JSONLLogger(str(tmp_path))
    trainer = build_trainer(train, batch_size=4, val_loader=val_loader, val_every_n_steps=2, metric_logger=logger)
    trainer.fit()
    logger.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    val_records = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val_records] == [2, 4]
    step_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in step_records] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens_per_second", "trained_tokens", "peak_rss_gib"} <= set(step_records[0])
    # the final validation loss, recomputed independently on the trained model
    total, count = 0.0, 0
    with torch.no_grad():
        trainer.model.eval()
        for i in range(len(val)):
            item = val[i]
            logits = trainer.model(item["tokens"][None])[0]
            keep = item["labels"] != IGNORE_INDEX
            total += F.cross_entropy(logits[keep], item["labels"][keep], reduction="sum").item()
            count += int(keep.sum())
    assert val_records[-1]["val_loss"] == pytest.approx(total / count, rel=1e-5)


def test_log_peak_memory_stats_false_leaves_memory_out_of_the_metrics(tmp_path):
    logger = JSONLLogger(str(tmp_path))
    build_trainer(learnable_dataset(8), batch_size=4, metric_logger=logger, log_peak_memory_stats=False).fit()
    logger.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert not any(key.startswith(("peak_", "memory_")) for record in records for key in record)


def test_pruning_keeps_another_runs_checkpoints(tmp_path):
    """keep_last_n_checkpoints prunes this run's line only: a longer earlier run's step_12 in the same
    folder survives, and a run resumed from step_4 prunes step_2 and step_4 but not step_12."""
    (tmp_path / "step_12").mkdir()  # an earlier, longer run's checkpoint
    trainer = build_trainer(learnable_dataset(16), batch_size=2, output_dir=str(tmp_path), save_every_n_steps=2,
                            keep_last_n_checkpoints=1, max_steps_per_epoch=4)
    trainer.fit()
    assert sorted(os.listdir(tmp_path)) == ["step_12", "step_4"]
    (tmp_path / "step_2").mkdir()
    resumed = build_trainer(learnable_dataset(16), batch_size=2, output_dir=str(tmp_path), save_every_n_steps=2,
                            keep_last_n_checkpoints=1, max_steps_per_epoch=8)
    resumed.load_checkpoint(str(tmp_path / "step_4"))
    resumed.fit()
    assert sorted(os.listdir(tmp_path)) == ["step_12", "step_8"]


@pytest.mark.parametrize("change, message", [
    ({"accum": 2}, "was written with gradient_accumulation_steps=1, this run has gradient_accumulation_steps=2; "
                   "resume with the same gradient_accumulation_steps"),
    ({"optimizer": "SGD"}, "was written with optimizer_class=AdamW, this run has optimizer_class=SGD; resume with the "
                           "same optimizer"),
])
def test_resume_with_other_accumulation_or_optimizer_is_one_clear_line(tmp_path, change, message):
    build_trainer(learnable_dataset(16), batch_size=2, output_dir=str(tmp_path), save_every_n_steps=2,
                  max_steps_per_epoch=2).fit()
    trainer = build_trainer(learnable_dataset(16), batch_size=2, accum=change.get("accum", 1))
    if "optimizer" in change:
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(QattuneError) as err:
        trainer.load_checkpoint(str(tmp_path / "step_2"))
    assert str(err.value) == f"checkpoint '{tmp_path / 'step_2'}' {message}"


def test_optimizer_state_that_does_not_fit_is_one_clear_line(tmp_path):
    build_trainer(learnable_dataset(16), batch_size=2, output_dir=str(tmp_path), max_steps_per_epoch=2).fit()
    trainer = build_trainer(learnable_dataset(16), batch_size=2)
    trainer.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(QattuneError) as err:
        trainer.load_checkpoint(str(tmp_path / "step_2"))
    assert str(err.value).startswith(f"checkpoint '{tmp_path / 'step_2'}': its optimizer state does not fit this "
                                     "run's AdamW (ValueError: ")
    assert str(err.value).endswith("resume with the optimizer (and parameter groups) the run was started with")
