"""Parts of the loop: losses, LR schedules, loggers, profiler, activation checkpointing, compile,
and a packed batch through a model (attention stays inside each document)."""

import importlib.util
import json
import math
import re
import os

import pytest
import torch
import torch.nn.functional as F
from training_harness import build_trainer
from training_toys import VOCAB, RecordingQuantizer, learnable_dataset, learnable_samples, make_model

from qattune.data import IGNORE_INDEX, StatefulDataLoader, pack_samples, padded_collate
from qattune.errors import QattuneError
from qattune.training import (
    CrossEntropyLoss,
    DistillationLoss,
    FakeQuantAfterNSteps,
    JSONLLogger,
    RoundingAtStep,
    StdoutLogger,
    TensorBoardLogger,
    apply_activation_checkpointing,
    compile_blocks,
    fake_quant_enabled_at,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    setup_profiler,
)


def _logits_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (2, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    return logits, labels


def test_cross_entropy_is_a_sum_over_trained_tokens():
    logits, labels = _logits_labels()
    expected = sum(
        -torch.log_softmax(logits[b, i], -1)[labels[b, i]] for b in range(2) for i in range(5) if labels[b, i] != IGNORE_INDEX
    )
    assert CrossEntropyLoss()(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_distillation_loss_mixes_ce_and_kl():
    logits, labels = _logits_labels()
    teacher, _ = _logits_labels(seed=1)
    ce = CrossEntropyLoss()(logits, labels)
    kl = 0.0
    for b in range(2):
        for i in range(5):
            if labels[b, i] != IGNORE_INDEX:
                p = torch.softmax(teacher[b, i] / 2.0, -1)
                q = torch.softmax(logits[b, i] / 2.0, -1)
                kl += (p * (p.log() - q.log())).sum() * 4.0
    loss = DistillationLoss(kd_weight=0.25, temperature=2.0)(logits, labels, teacher)
    assert loss.item() == pytest.approx((0.75 * ce + 0.25 * kl).item(), rel=1e-5)
    assert DistillationLoss(kd_weight=0.0)(logits, labels, teacher).item() == pytest.approx(ce.item(), rel=1e-6)
    assert DistillationLoss(kd_weight=1.0)(logits, labels, logits).item() == pytest.approx(0.0, abs=1e-4)
    # no teacher logits (a snapshot teacher not yet taken): the whole cross entropy, whatever kd_weight
    assert DistillationLoss(kd_weight=0.9)(logits, labels).item() == pytest.approx(ce.item(), rel=1e-6)


def test_loss_settings_and_a_missing_teacher_are_refused():
    from qattune.training.distillation import build_teacher

    with pytest.raises(QattuneError, match=re.escape(
            "loss.ignore_index=-1: qattune's datasets mark the labels not trained on with -100 (as torchtune does), "
            "and the loss must skip those; remove loss.ignore_index")):
        CrossEntropyLoss(ignore_index=-1)
    assert DistillationLoss(ignore_index=-100).ignore_index == -100
    for kwargs, message in [({"kd_weight": 2}, "loss.kd_weight must be in [0, 1] (the teacher's share of the loss), got 2"),
                            ({"temperature": 0}, "loss.temperature must be > 0 (1: the distributions as they are), got 0"),
                            ({"temperature": -1.0}, "loss.temperature must be > 0")]:
        with pytest.raises(QattuneError, match=re.escape(message)):
            DistillationLoss(**kwargs)
    with pytest.raises(QattuneError, match="^loss DistillationLoss distills from a teacher, which only the qat_distributed "
                                           "recipe builds: run that recipe, or use qattune.training.CrossEntropyLoss$"):
        build_trainer(learnable_dataset(4), batch_size=4, epochs=1, lr=1e-2, save_model=None, loss_fn=DistillationLoss())
    for args, key in [(("/some/run", "start"), "teacher_checkpoint_dir"),
                      ((None, "fake_quant_start"), "teacher_snapshot=fake_quant_start")]:
        with pytest.raises(QattuneError, match=f"^{key} names a distillation teacher, but the loss is not one: set "
                                               "loss._component_=qattune.training.DistillationLoss, or remove it$"):
            build_teacher(None, CrossEntropyLoss(), *args)
    assert build_teacher(None, CrossEntropyLoss(), None, "start") is None


def test_distillation_trains_towards_the_teacher():
    teacher = make_model(seed=3).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    val = learnable_dataset(4, seed=8)
    val_loader = StatefulDataLoader(val, 4, padded_collate, shuffle=False, drop_last=False)
    trainer = build_trainer(
        learnable_dataset(16), batch_size=4, epochs=2, lr=1e-2, teacher_model=teacher, save_model=None,
        loss_fn=DistillationLoss(kd_weight=1.0), val_loader=val_loader,
    )
    losses = trainer.fit()
    assert losses[-1] < 0.5 * losses[0]
    # validation reports plain token cross entropy, not the distillation objective
    batch = padded_collate([val[i] for i in range(4)])
    with torch.no_grad():
        logits = trainer.model.eval()(batch["tokens"])
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1)).item()
    assert trainer.validate() == pytest.approx(expected, rel=1e-5)


def test_lr_schedules_follow_their_formulas():
    param = torch.nn.Parameter(torch.zeros(1))
    cosine = get_cosine_schedule_with_warmup(torch.optim.SGD([param], lr=2.0), 3, 13)
    linear = get_linear_schedule_with_warmup(torch.optim.SGD([param], lr=2.0), 3, 13)
    for step in range(14):
        if step < 3:
            want_cos = want_lin = 2.0 * (step + 1) / 4
        else:
            progress = (step - 3) / 10
            want_cos = 2.0 * 0.5 * (1 + math.cos(math.pi * progress))
            want_lin = 2.0 * (1 - progress)
        assert cosine.get_last_lr()[0] == pytest.approx(want_cos, abs=1e-12)
        assert linear.get_last_lr()[0] == pytest.approx(want_lin, abs=1e-12)
        cosine.optimizer.step(), linear.optimizer.step(), cosine.step(), linear.step()


def test_fake_quant_rule_and_hook_checks():
    assert [fake_quant_enabled_at(s, 2) for s in range(4)] == [False, False, True, True]
    assert fake_quant_enabled_at(0, None) and fake_quant_enabled_at(0, 0)
    with pytest.raises(QattuneError, match=re.escape(
            "quantizer object has no set_fake_quant(model, enabled), which fake_quant_after_n_steps=3 needs; use "
            "qattune.quant.QATQuantizer, or set fake_quant_after_n_steps=null (fake quantization from the start)")):
        FakeQuantAfterNSteps(object(), make_model(), 3)
    for from_the_start in (None, 0):  # what prepare did already: nothing to switch (torchao's quantizers)
        FakeQuantAfterNSteps(object(), make_model(), from_the_start).on_step_start(0)
    with pytest.raises(QattuneError, match="must be >= 0 or null, got -1"):
        FakeQuantAfterNSteps(RecordingQuantizer(), make_model(), -1)


def test_rounding_runs_once_at_its_step_and_never_when_resumed_past_it():
    calls = []
    hook = RoundingAtStep(lambda: calls.append("rounded"), at_step=2)
    for step in (0, 1, 2, 2, 3):
        hook.on_step_start(step)
    assert calls == ["rounded"]
    resumed_later = RoundingAtStep(lambda: calls.append("again"), at_step=2)
    for step in (3, 4):
        resumed_later.on_step_start(step)
    assert calls == ["rounded"]


def test_loggers(tmp_path, capsys):
    StdoutLogger().log({"loss": 1.5, "lr": 0.001}, step=3)
    assert capsys.readouterr().out == "step 3 | loss=1.5 lr=0.001\n"
    logger = JSONLLogger(str(tmp_path / "logs"))
    logger.log({"loss": 2.0}, step=1)
    logger.log({"loss": 1.0}, step=2)
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 2.0), (2, 1.0)]
    torchtune_disk_logger = JSONLLogger(str(tmp_path / "null"), filename=None)  # DiskLogger(filename: null)
    assert not (tmp_path / "null").exists()  # nothing is opened before the run starts
    torchtune_disk_logger.start(0)
    torchtune_disk_logger.close()
    assert [p.name for p in (tmp_path / "null").iterdir()] == ["metrics.jsonl"]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(QattuneError, match="needs the tensorboard package, which is not installed"):
            TensorBoardLogger(str(tmp_path / "tb"))


def test_a_resumed_or_repeated_run_keeps_one_series_of_steps(tmp_path):
    """Resumed at step 4 after a crash at 6, the log drops the interrupted run's 5 and 6 (logged again);
    a fresh run in the same folder moves the earlier run's file aside."""
    def run(start, steps):
        logger = JSONLLogger(str(tmp_path))
        logger.start(start)
        for step in steps:
            logger.log({"loss": float(step)}, step)
        logger.close()

    def steps(name="metrics.jsonl"):
        return [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()]

    run(0, range(1, 7))
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 7, "lo')  # a crash mid-write
    run(4, range(5, 9))
    assert steps() == [1, 2, 3, 4, 5, 6, 7, 8]
    run(0, range(1, 3))
    assert steps() == [1, 2] and steps("metrics.1.jsonl") == [1, 2, 3, 4, 5, 6, 7, 8]
    run(0, range(1, 2))
    assert steps("metrics.2.jsonl") == [1, 2] and steps() == [1]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_hides_the_steps_a_resumed_run_repeats(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for start, steps in ((0, range(1, 7)), (4, range(5, 9))):
        logger = TensorBoardLogger(str(tmp_path))
        logger.start(start)
        for step in steps:
            logger.log({"loss": float(step)}, step)
        logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))


def test_profiler_writes_a_trace(tmp_path):
    profiler = setup_profiler(enabled=True, output_dir=str(tmp_path / "prof"), wait_steps=0, warmup_steps=1, active_steps=1)
    build_trainer(learnable_dataset(8), batch_size=2, profiler=profiler, save_model=None).fit()
    traces = os.listdir(tmp_path / "prof")
    assert len(traces) == 1 and traces[0].startswith("rank0") and traces[0].endswith(".pt.trace.json")


def _grads_after_one_backward(model, batch):
    loss = CrossEntropyLoss()(model(batch["tokens"]), batch["labels"])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_and_compile_keep_numerics():
    batch = padded_collate([learnable_dataset(4)[i] for i in range(4)])
    base_loss, base_grads = _grads_after_one_backward(make_model(), batch)
    checkpointed = apply_activation_checkpointing(make_model())
    assert list(checkpointed.state_dict()) == list(make_model().state_dict())
    loss, grads = _grads_after_one_backward(checkpointed, batch)
    assert loss == base_loss and all(torch.allclose(grads[n], g, atol=1e-6) for n, g in base_grads.items())
    compiled = compile_blocks(apply_activation_checkpointing(make_model()), backend="eager")
    loss, grads = _grads_after_one_backward(compiled, batch)
    assert loss == pytest.approx(base_loss, abs=1e-6)
    assert all(torch.allclose(grads[n], g, atol=1e-5) for n, g in base_grads.items())


def test_compiling_fake_quantized_blocks_on_torch_2_11_is_refused(monkeypatch):
    """torch 2.11 trained compiled fake-quantized blocks with zero gradients (found on a GPU machine)."""
    from torch.torch_version import TorchVersion

    from qattune.quant import QATQuantizer

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.11.0+cu130"))
    with pytest.raises(QattuneError, match=r"compile: true with fake quantization is not supported on torch "
                                           r"2.11.0\+cu130: .*zero gradients.*Set compile: false"):
        compile_blocks(QATQuantizer("8da4w", group_size=16).prepare(make_model()), backend="eager")
    compile_blocks(make_model(), backend="eager")  # a float model compiles on any torch
    for fine in ("2.10.0", "2.12.0"):
        monkeypatch.setattr(torch, "__version__", TorchVersion(fine))
        compile_blocks(QATQuantizer("8da4w", group_size=16).prepare(make_model()), backend="eager")


def test_model_without_layers_is_refused():
    with pytest.raises(QattuneError, match="has no nn.ModuleList 'layers'"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2))


def test_packed_batch_equals_documents_run_alone():
    samples = learnable_samples(4, seed=4, min_len=3, max_len=9)
    packs = pack_samples(samples, max_seq_len=24, pad_id=0, split_across_pack=False)
    batch = padded_collate(packs)
    model = make_model().eval()
    with torch.no_grad():
        packed_logits = model(batch["tokens"], input_pos=batch["input_pos"], mask=batch["mask"])
        offsets = {}
        row_fill = [0] * len(packs)
        for sample in samples:
            # find where pack_samples placed this document (packs keep order)
            for row in range(len(packs)):
                n = len(sample.tokens)
                start = row_fill[row]
                if packs[row]["tokens"][start : start + n].tolist() == sample.tokens.tolist() and start + n <= 24:
                    offsets[id(sample)] = (row, start)
                    row_fill[row] += n
                    break
        assert len(offsets) == len(samples)
        for sample in samples:
            row, start = offsets[id(sample)]
            alone = model(torch.from_numpy(sample.tokens).long()[None])[0]
            n = len(sample.tokens)
            assert torch.allclose(packed_logits[row, start : start + n], alone, atol=1e-5)
    assert F.cross_entropy(packed_logits.reshape(-1, VOCAB), batch["labels"].reshape(-1)).isfinite()


def test_resolve_dtype():
    from qattune.training import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("bf16", cpu) is torch.bfloat16 and resolve_dtype("FP32", cpu) is torch.float32
    with pytest.raises(QattuneError, match="dtype 'int8' is not supported; use one of fp32, bf16, fp16"):
        resolve_dtype("int8", cpu)


def test_bf16_model_trains_with_fp32_loss():
    model = make_model().to(torch.bfloat16)
    losses = build_trainer(learnable_dataset(32), model=model, batch_size=8, epochs=3, lr=1e-2, save_model=None).fit()
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.6 * losses[0]


def test_progress_bar_shows_loss_and_throughput(capsys):
    build_trainer(learnable_dataset(8), batch_size=2, save_model=None, progress_bar=True).fit()
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=" in err and "tok_s=" in err


def test_too_little_data_for_accumulation_is_one_clear_line():
    trainer = build_trainer(learnable_dataset(4), batch_size=2, accum=4, save_model=None)
    with pytest.raises(QattuneError, match="gives 2 batch\\(es\\) per epoch, fewer than gradient_accumulation_steps=4"):
        trainer.fit()


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from qattune.training.rng import rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == first


def test_cuda_rng_state_is_this_devices_only(monkeypatch):
    """A resume that sees fewer GPUs than the save did (CUDA_VISIBLE_DEVICES, a smaller node) restores
    the state of its own device; torch's set_rng_state_all indexed past the visible ones."""
    from qattune.training import rng

    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.full((4,), device, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({device: state.tolist()}))
    state = rng.rng_state()
    assert state["cuda"].tolist() == [1, 1, 1, 1]
    rng.set_rng_state(state)
    assert restored == {1: [1, 1, 1, 1]}
    restored.clear()  # an older checkpoint's list of every visible device's states
    rng.set_rng_state({**state, "cuda": [torch.zeros(4, dtype=torch.uint8), torch.full((4,), 7, dtype=torch.uint8)]})
    assert restored == {1: [7, 7, 7, 7]}
    restored.clear()
    rng.set_rng_state({**state, "cuda": [torch.zeros(4, dtype=torch.uint8)]})  # saved where one GPU was visible
    assert restored == {}


def test_damaged_recipe_state_is_one_clear_line(tmp_path):
    (tmp_path / "recipe_state.pt").write_bytes(b"not a checkpoint")
    from qattune.training.checkpoint_dirs import load_recipe_state

    with pytest.raises(QattuneError) as err:
        load_recipe_state(str(tmp_path))
    assert "could not be read as qattune recipe state" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("device, says", [
    ("gpu", "device=gpu is not a device torch knows"),
    ("cuda:x", "device=cuda:x is not a device torch knows"),
])
def test_unknown_device_is_one_clear_line(device, says):
    from qattune.training.distributed import parse_device

    with pytest.raises(QattuneError) as err:
        parse_device(device)
    assert str(err.value).startswith(says) and str(err.value).endswith("use cpu, cuda, cuda:N or mps")
    assert "\n" not in str(err.value)
    assert parse_device("cpu") == torch.device("cpu")


def test_cuda_device_indices_are_checked(monkeypatch):
    """A GPU that is not there, or one GPU for every torchrun process, is one line (CUDA faked: the
    checks run before any CUDA call)."""
    from qattune.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(QattuneError, match=re.escape(
            "device=cuda:5: this machine shows 2 CUDA GPU(s), cuda:0 to cuda:1; pick one of those "
            "(CUDA_VISIBLE_DEVICES renumbers them from 0)")):
        distributed.parse_device("cuda:5")
    assert distributed.parse_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(QattuneError, match=re.escape(
            "device=cuda:0 under torchrun: each process trains on its own GPU, cuda:LOCAL_RANK (here cuda:1); "
            "set device=cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES")):
        distributed.init_distributed("cuda:0")


def test_unwritable_output_dir_is_one_clear_line(tmp_path):
    from qattune.checkpoint import writable_directory

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(QattuneError) as err:
        writable_directory(str(blocker / "out"))
    assert str(err.value) == (f"output_dir={blocker}/out cannot be written (Not a directory: {blocker}/out); "
                              "set output_dir to a folder you can write")
    made = writable_directory(str(tmp_path / "new" / "out"), key="x")
    assert made.is_dir() and list(made.iterdir()) == []


def test_torchtune_options_qattune_cannot_honour_are_each_one_line():
    """The training recipes' Unsupported keys, as `validate` and `run` report them (before anything runs)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from qattune.config.schema import read_schema
    from qattune.config.validate import validate_config

    schema = read_schema(Path(__file__).parents[2] / "recipes" / "full_finetune.py")
    base = {"output_dir": "/o", "model": {"_component_": "qattune.models.llama3_2_1b"},
            "tokenizer": {"_component_": "qattune.tokenizers.byte_tokenizer"},
            "dataset": {"_component_": "qattune.data.python_docs_dataset"},
            "optimizer": {"_component_": "torch.optim.AdamW"}}

    def problems(**keys):
        return [str(p) for p in validate_config(OmegaConf.create({**base, **keys}), schema)]

    assert problems(optimizer_in_bwd=False, fsdp_sharding_strategy="FULL_SHARD", ac_mode=None,
                    collate_fn="torchtune.data.padded_collate_sft") == []
    assert problems(optimizer_in_bwd=True, fsdp_sharding_strategy="SHARD_GRAD_OP", ac_mode="selective",
                    collate_fn="my.collate") == [
        "optimizer_in_bwd=true is not supported: qattune steps the optimizer after backward; set optimizer_in_bwd=false",
        "fsdp_sharding_strategy=SHARD_GRAD_OP is not supported: FSDP2 shards parameters, gradients and optimizer "
        "state (FULL_SHARD); remove the key",
        "ac_mode=selective is not supported: selective activation checkpointing is not available; use "
        "enable_activation_checkpointing=true",
        "collate_fn=my.collate is not supported: batches go through qattune.data.padded_collate (padded and packed "
        "data alike); remove the key",
    ]


def test_checkpoint_commit_replaces_a_step_whole_and_publishes_readable_files(tmp_path, monkeypatch):
    from qattune.training import checkpoint_dirs as ckpt

    final = str(tmp_path / "step_4")
    os.makedirs(final)
    (tmp_path / "step_4" / "old.txt").write_text("old")
    (tmp_path / ".step_4.tmp.tmp-1-dead").mkdir()  # what a save killed mid-write leaves behind
    tmp = ckpt.begin_checkpoint(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_4.tmp"]
    weights = tmp_path / "step_4.tmp" / "model.safetensors"
    weights.write_text("new")
    os.chmod(weights, 0o600)  # as safetensors writes its files
    old_umask = os.umask(0o022)
    renames = []
    real_replace = os.replace

    def recording_replace(source, target):
        renames.append((os.path.basename(source), os.path.basename(target)))
        real_replace(source, target)

    monkeypatch.setattr(ckpt.os, "replace", recording_replace)
    try:
        ckpt.commit_checkpoint(tmp, final)
    finally:
        os.umask(old_umask)
    # the old step is moved aside before the new one takes its name: no moment without a complete step_4
    assert renames[0][0] == "step_4" and renames[0][1].startswith(".step_4.old-") and renames[1] == ("step_4.tmp", "step_4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4"]
    assert [p.name for p in (tmp_path / "step_4").iterdir()] == ["model.safetensors"]
    assert oct((tmp_path / "step_4" / "model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_config_numbers_are_checked_before_anything_is_built():
    from qattune.training.session import _check_numbers

    def refusal(**cfg):
        with pytest.raises(QattuneError) as err:
            _check_numbers(cfg)
        return str(err.value)

    assert refusal(clip_grad_norm=-1.0) == ("clip_grad_norm=-1.0: must be positive (a negative norm would flip the "
                                            "gradients); null turns clipping off")
    for key in ("log_every_n_steps", "gradient_accumulation_steps", "max_steps_per_epoch", "max_val_batches"):
        assert refusal(**{key: 0}) == f"{key}=0: must be a whole number of at least 1 (or null where it may be unset)"
    assert refusal(run_val_every_n_steps=2, dataset_val=None) == (
        "run_val_every_n_steps is set but there is no dataset_val to validate on; set dataset_val or "
        "run_val_every_n_steps=null")
    _check_numbers({"clip_grad_norm": 1.0, "max_steps_per_epoch": None, "run_val_every_n_steps": 2,
                    "dataset_val": {"_component_": "x"}})
