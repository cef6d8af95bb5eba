"""The training recipes through the real CLI on tiny configs: losses, QAT switching, resume, torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SMALL = ["max_steps_per_epoch=8", "batch_size=4", "dataset.max_seq_len=64", "dataset_val.max_seq_len=64",
         "run_val_every_n_steps=null", "progress_bar=false", "save_every_n_steps=2", "keep_last_n_checkpoints=null"]


def run_cli(*args: str, nproc: int = 1, cwd=None, returncode: int = 0) -> subprocess.CompletedProcess:
    launch = ["--nproc_per_node", str(nproc), "--standalone"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, "-m", "qattune.cli.main", "run", *launch, *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=cwd)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


def metrics(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qat") / "run"
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", "fake_quant_after_n_steps=4", *SMALL)
    return out


def test_qat_losses_go_down_and_match_expected_values(qat_run):
    rows = metrics(qat_run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    losses = [r["loss"] for r in rows]
    # Seeded fp32 CPU run: the same values on every machine up to float summation order.
    expected = [5.821, 5.6798, 5.5399, 5.4662, 5.3815, 5.1466, 5.1952, 4.8341]
    assert losses == pytest.approx(expected, abs=5e-3)
    assert losses[-1] < losses[0] - 0.9
    assert all(r["processed_tokens"] == 4 * 64 and 0.9 * 256 < r["trained_tokens"] <= 256 for r in rows)


def test_fake_quant_switches_on_at_step_n(qat_run):
    assert [r["fake_quant_enabled"] for r in metrics(qat_run)] == [0.0] * 4 + [1.0] * 4


def test_qat_checkpoint_is_a_float_hf_model_with_the_scheme_recorded(qat_run):
    step = qat_run / "step_8"
    assert {p.name for p in step.iterdir()} >= {"config.json", "model.safetensors", "recipe_state.pt",
                                               "qattune_training.json"}
    info = json.loads((step / "qattune_training.json").read_text())
    assert info["step"] == 8
    assert info["quantizer"]["scheme"] == "8da4w" and info["quantizer"]["group_size"] == 32
    from safetensors import safe_open

    with safe_open(str(step / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype.is_floating_point
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names


def test_resuming_a_finished_run_says_there_is_nothing_to_train(qat_run, tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    shutil.copytree(qat_run / "step_8", out / "step_8")
    proc = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", "fake_quant_after_n_steps=4",
                   "resume_from_checkpoint=true", *SMALL)
    assert proc.stdout.strip().splitlines()[-1] == (
        "Nothing to train: the checkpoint finished the run's last epoch (epochs=1) at step 8; raise epochs to "
        "train further")
    # another epoch trains on; with validation off (SMALL), dataset_val is not even built, as in torchtune
    proc = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", "fake_quant_after_n_steps=4",
                   "resume_from_checkpoint=true", *SMALL, "epochs=2",
                   "dataset_val={_component_: qattune.data.text_completion_dataset, source: /no/such/val.jsonl}")
    assert proc.stdout.strip().splitlines()[-1].startswith("Finished 16 steps: final loss ")
    # a fresh run would write its step_N over this run's: refused, unless told to replace it
    fresh = ["qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *SMALL]
    assert run_cli(*fresh, returncode=2).stderr.strip() == (
        f"error: output_dir {out} already holds checkpoints up to step_16 of an earlier run, which this run would "
        "overwrite: set resume_from_checkpoint=true to continue it, choose another output_dir, or set "
        "overwrite_output_dir=true to replace it")
    run_cli(*fresh, "overwrite_output_dir=true", "max_steps_per_epoch=2", "save_every_n_steps=null")
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2"]


def test_resuming_with_other_quantizer_options_is_refused(qat_run, tmp_path):
    shutil.copytree(qat_run / "step_2", tmp_path / "step_2")
    proc = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path}", "fake_quant_after_n_steps=4",
                   "resume_from_checkpoint=true", *SMALL, "quantizer.group_size=64", returncode=2)
    assert proc.stderr.strip() == (
        f"error: {tmp_path / 'step_2'} was trained with scheme '8da4w' with group size 32 (qattune_training.json); "
        "resume with the same options: quantizer.group_size=32")


@pytest.mark.parametrize("resume_step", [2, 6])
def test_resume_gives_the_same_losses_and_fake_quant_state(qat_run, tmp_path, resume_step):
    """Resume from a checkpoint taken before N (step 2) and after it (step 6)."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(qat_run / f"step_{resume_step}", out / f"step_{resume_step}")
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", "fake_quant_after_n_steps=4",
            "resume_from_checkpoint=true", *SMALL)
    straight = metrics(qat_run)[resume_step:]
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["fake_quant_enabled"] for r in resumed] == [r["fake_quant_enabled"] for r in straight]


def test_full_finetune_learns_and_saves(tmp_path):
    out = tmp_path / "full"
    run_cli("full_finetune", "--config", "tiny/full", f"output_dir={out}", *SMALL)
    rows = metrics(out)
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"] - 0.9
    assert "fake_quant_enabled" not in rows[0]
    info = json.loads((out / "step_8" / "qattune_training.json").read_text())
    assert info == {"step": 8}


@pytest.mark.parametrize("recompute", [["+quantizer.recompute_weights=false"], ["+quantizer.recompute_activations=true"]],
                         ids=["stored", "recomputed"])
def test_two_processes_match_one_with_the_same_global_batch(qat_run, tmp_path, recompute):
    """Also with the low-memory options (FSDP2-sharded weights, recomputed in the backward: the default
    under torchrun; with recompute_activations), which give the stored path's numbers."""
    out = tmp_path / "two"
    small = [o for o in SMALL if not o.startswith(("batch_size", "save_every"))]
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", "fake_quant_after_n_steps=4",
            "batch_size=2", "save_every_n_steps=null", *small, *recompute, nproc=2)
    one = [r["loss"] for r in metrics(qat_run)]
    two = [r["loss"] for r in metrics(out)]
    # Float steps agree to summation order; once fake quantization is on, a last-bit difference can move a
    # weight across an int4 rounding boundary, so the fake-quantized steps agree a little less tightly.
    assert two[:4] == pytest.approx(one[:4], abs=1e-4)
    assert two[4:] == pytest.approx(one[4:], abs=3e-3)


def test_a_checkpoint_only_rank0_reads_fails_in_one_line_under_torchrun(qat_run, tmp_path):
    """Rank 0 reads the weights; its mistake reaches the other rank before the sharding collective, so it
    stops quietly instead of with a traceback from the broken connection."""
    start = ["checkpointer={_component_: qattune.checkpoint.HFCheckpointer, "
             f"checkpoint_dir: {qat_run / 'step_4'}}}", "model.num_layers=3"]
    proc = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path}", *start, *SMALL,
                   nproc=2, returncode=2)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: model qattune.models.llama (model) has tensor 'layers.2.attn_norm.weight' that "
                      f"checkpoint {qat_run / 'step_4'} lacks"], proc.stderr[-2000:]


def test_two_processes_learn_fp32_ranges_in_a_bf16_model(tmp_path):
    """FSDP2 wants one dtype per group: the fp32 learned scales of a bf16 model get groups of their own
    (every rank died in fully_shard's dtype check) and train as in one process."""
    from safetensors.torch import load_file

    small = [o for o in SMALL if not o.startswith(("batch_size", "max_steps", "save_every"))]
    bf16 = ["dtype=bf16", "+quantizer.range_learning=true", "fake_quant_after_n_steps=null", "max_steps_per_epoch=3",
            "save_every_n_steps=null", *small]
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path / 'one'}", "batch_size=4", *bf16)
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path / 'two'}", "batch_size=2", *bf16,
            nproc=2)
    one, two = ([r["loss"] for r in metrics(tmp_path / run)] for run in ("one", "two"))
    assert two == pytest.approx(one, abs=2e-3)
    scales = load_file(tmp_path / "two" / "step_3" / "extra_state.safetensors")
    assert scales["layers.0.attn.q_proj.weight_range_learner.scale"].dtype == torch.float32
    model = load_file(tmp_path / "two" / "step_3" / "model.safetensors")
    assert model["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_two_processes_resume_a_stateless_optimizer(tmp_path):
    """SGD without momentum saves no per-parameter state; torch's sharded loader asserted on it.
    Warnings come once, not once per rank."""
    sgd = ["optimizer={_component_: torch.optim.SGD, lr: 0.5}", "max_steps_per_epoch=4", "batch_size=2",
           "fake_quant_after_n_steps=100"]  # float throughout, so the resumed losses are exact
    small = [o for o in SMALL if not o.startswith(("batch_size", "max_steps"))]
    proc = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path / 'straight'}", *sgd, *small,
                   nproc=2)
    assert proc.stderr.count("fake_quant_after_n_steps=100 but the run has 4 steps") == 1
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "step_2", tmp_path / "resumed" / "step_2")
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path / 'resumed'}",
            "resume_from_checkpoint=true", *sgd, *small, nproc=2)
    straight = metrics(tmp_path / "straight")
    assert [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "resumed")] == [
        (r["step"], r["loss"], r["lr"]) for r in straight[2:]]


@pytest.mark.parametrize("scheme", [[], ["quantizer.scheme=q4_0", "~quantizer.group_size"]], ids=["8da4w", "q4_0"])
def test_two_processes_start_from_a_checkpoint_only_rank0_reads(qat_run, tmp_path, scheme):
    """Sharded loading: rank 0 loads the checkpoint, the other rank builds on meta and receives its
    shards; learned ranges (q4_0's signed block scales too) start from the weight shards when fake
    quantization turns on."""
    start = ["checkpointer={_component_: qattune.checkpoint.HFCheckpointer, "
             f"checkpoint_dir: {qat_run / 'step_4'}, output_dir: ${{output_dir}}}}",
             "+quantizer.range_learning=true", "fake_quant_after_n_steps=2", "max_steps_per_epoch=4",
             "save_every_n_steps=null", *scheme]
    small = [o for o in SMALL if not o.startswith(("batch_size", "save_every", "max_steps"))]
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path / 'one'}", "batch_size=4",
            *start, *small)
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path / 'two'}", "batch_size=2",
            *start, *small, nproc=2)
    one = [r["loss"] for r in metrics(tmp_path / "one")]
    two = [r["loss"] for r in metrics(tmp_path / "two")]
    assert one[0] < 5.5  # the checkpoint's weights, not a fresh model's (5.82 at step 1)
    assert two == pytest.approx(one, abs=3e-3)


def test_relative_output_dir_keeps_each_checkpoint_whole(qat_run, tmp_path):
    """A relative output_dir (with a torchtune-style checkpointer.output_dir elsewhere) puts the model files
    and the recipe state of a step in one folder, output_dir/step_N."""
    start = ["checkpointer={_component_: qattune.checkpoint.HFCheckpointer, "
             f"checkpoint_dir: {qat_run / 'step_8'}, output_dir: elsewhere}}"]
    small = [o for o in SMALL if not o.startswith(("max_steps", "save_every"))]
    proc = run_cli("full_finetune", "--config", "tiny/full", "output_dir=rel", "max_steps_per_epoch=1", *start,
                   *small, cwd=tmp_path)
    assert (f"checkpointer.output_dir=elsewhere differs from output_dir={tmp_path / 'rel'}: checkpoints "
            "(model and recipe state) are written to output_dir/step_N") in proc.stderr
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == [".qattune.lock", "logs", "step_1"]
    assert {"config.json", "model.safetensors", "recipe_state.pt"} <= {p.name for p in (tmp_path / "rel" / "step_1").iterdir()}
    assert not (tmp_path / "elsewhere").exists()


def test_data_longer_than_the_model_is_refused_before_training(tmp_path):
    proc = run_cli("full_finetune", "--config", "tiny/full", f"output_dir={tmp_path}", "dataset.max_seq_len=512",
                   "~dataset_val", "run_val_every_n_steps=null", returncode=2)
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: dataset has sequences of up to 512 tokens, longer than the model's max_seq_len=256: set "
        "dataset.max_seq_len to at most 256, or raise the model's if it handles longer inputs")
    assert not (tmp_path / "logs").exists()


def test_a_meta_checkpoint_trains_into_hf_layout_that_resumes(qat_run, tmp_path):
    from qattune.checkpoint import HFCheckpointer
    from qattune.models import get_adapter

    source = HFCheckpointer(str(qat_run / "step_8"))
    state_dict, _ = source.load()
    adapter = get_adapter("llama")
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save(adapter.to_meta(state_dict, source.config), meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(adapter.config_to_meta(source.config)))
    (meta / "tokenizer.model").write_bytes(b"the source's tokenizer")
    start = [f"checkpointer={{_component_: qattune.checkpoint.MetaCheckpointer, checkpoint_dir: {meta}, "
             "model_type: llama}"]
    small = [o for o in SMALL if not o.startswith(("max_steps", "save_every"))] + ["save_every_n_steps=1"]
    run_cli("full_finetune", "--config", "tiny/full", f"output_dir={tmp_path / 'out'}", "max_steps_per_epoch=2",
            *start, *small)
    step_1 = tmp_path / "out" / "step_1"
    assert {"config.json", "model.safetensors", "recipe_state.pt"} <= {p.name for p in step_1.iterdir()}
    # other tools get the source's tokenizer and the run tokenizer's ids, not LlamaConfig's defaults
    assert (step_1 / "tokenizer.model").read_bytes() == b"the source's tokenizer"
    from qattune.tokenizers import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = json.loads((step_1 / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.bos_id, tokenizer.stop_tokens, tokenizer.pad_id) == (256, [256, 258], 259)
    shutil.rmtree(tmp_path / "out" / "step_2")
    run_cli("full_finetune", "--config", "tiny/full", f"output_dir={tmp_path / 'out'}", "max_steps_per_epoch=2",
            "resume_from_checkpoint=true", *start, *small)
    assert (tmp_path / "out" / "step_2" / "model.safetensors").is_file()


def test_torch_schedules_are_told_the_run_length_and_metric_schedules_refused(tmp_path):
    small = [o for o in SMALL if not o.startswith(("max_steps", "save_every"))]
    one_cycle = ["lr_scheduler={_component_: torch.optim.lr_scheduler.OneCycleLR, max_lr: 0.01}", "max_steps_per_epoch=3"]
    run_cli("full_finetune", "--config", "tiny/full", f"output_dir={tmp_path / 'one'}", *one_cycle, *small)
    lrs = [r["lr"] for r in metrics(tmp_path / "one")]
    # told total_steps=3, the cycle ends at its floor, max_lr / 25 / 1e4, on the run's last step
    assert len(lrs) == 3 and lrs[-1] == pytest.approx(0.01 / 25 / 1e4) and max(lrs) <= 0.01
    proc = run_cli("full_finetune", "--config", "tiny/full", f"output_dir={tmp_path / 'plateau'}",
                   "lr_scheduler={_component_: torch.optim.lr_scheduler.ReduceLROnPlateau}", *small, returncode=2)
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: lr_scheduler torch.optim.lr_scheduler.ReduceLROnPlateau steps on a validation metric; qattune steps "
        "the schedule once per optimizer step: use a step schedule, e.g. qattune.training.get_cosine_schedule_with_warmup")


GPTQ_START = ["+quantizer.range_learning=true", "+quantizer.rounding_init=gptq", "+quantizer.gptq_batches=2",
              "fake_quant_after_n_steps=0"]


def test_gptq_rounding_start_runs_once_and_resumes_exactly(tmp_path):
    out = tmp_path / "gptq"
    first = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *GPTQ_START, *SMALL)
    assert "GPTQ rounding: 14 layers from 512 calibration tokens" in first.stdout  # 2 batches of 4 x 64
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(out / "step_4", resumed_dir / "step_4")
    resumed = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={resumed_dir}",
                      "resume_from_checkpoint=true", *GPTQ_START, *SMALL)
    assert "GPTQ rounding" not in resumed.stdout  # the checkpoint holds the trained latents already
    assert [r["loss"] for r in metrics(resumed_dir)] == [r["loss"] for r in metrics(out)[4:]]


def test_gptq_rounding_after_a_float_phase_runs_at_the_switch_and_resumes_exactly(qat_run, tmp_path):
    """With fake_quant_after_n_steps=4 the float phase trains as a plain QAT run's does, the rounding
    runs once before step 4 on the weights it trained, and runs resumed before and after it match."""
    after_float = [*GPTQ_START[:-1], "+quantizer.awq_scaling=true", "fake_quant_after_n_steps=4"]
    out = tmp_path / "switch"
    first = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *after_float, *SMALL)
    assert first.stdout.count("GPTQ rounding: 14 layers") == 1
    rows = metrics(out)
    assert [r["fake_quant_enabled"] for r in rows] == [0.0] * 4 + [1.0] * 4
    # Float steps: the plain QAT run's (same data, weights and optimizer; the learned scales are unused yet)
    assert [r["loss"] for r in rows[:4]] == pytest.approx([r["loss"] for r in metrics(qat_run)[:4]], abs=1e-5)
    for resume_at, rounds_again in (("step_4", True), ("step_6", False)):
        resumed_dir = tmp_path / resume_at
        resumed_dir.mkdir()
        shutil.copytree(out / resume_at, resumed_dir / resume_at)
        resumed = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={resumed_dir}",
                          "resume_from_checkpoint=true", *after_float, *SMALL)
        assert ("GPTQ rounding" in resumed.stdout) == rounds_again
        done = int(resume_at.removeprefix("step_"))
        assert [r["loss"] for r in metrics(resumed_dir)] == [r["loss"] for r in rows[done:]]


def test_two_processes_round_after_a_float_phase_on_rank0_and_share_the_result(qat_run, tmp_path):
    """At step 2 rank 0 gathers the sharded model, rounds a full copy and sends every rank its rows: with
    the learning rates at 0 the float phase keeps the loaded weights, so every row of every block weight
    must have moved to GPTQ's values by the end, and the scales be the loaded weights' covering grids."""
    from safetensors.torch import load_file

    from qattune.checkpoint import load_model
    from qattune.quant.formats import IntAffine

    start = ["checkpointer={_component_: qattune.checkpoint.HFCheckpointer, "
             f"checkpoint_dir: {qat_run / 'step_4'}, output_dir: ${{output_dir}}}}", "+quantizer.range_init=cover",
             "optimizer.lr=0", "range_learning_lr=0", "max_steps_per_epoch=4", "save_every_n_steps=null"]
    small = [o for o in SMALL if not o.startswith(("batch_size", "save_every", "max_steps"))]
    two = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path}", "batch_size=2",
                  *GPTQ_START[:-1], "fake_quant_after_n_steps=2", *start, *small, nproc=2)
    assert two.stdout.count("GPTQ rounding: 14 layers") == 1
    assert [r["fake_quant_enabled"] for r in metrics(tmp_path)] == [0.0] * 2 + [1.0] * 2
    loaded = dict(load_model(qat_run / "step_4").named_parameters())
    trained = dict(load_model(tmp_path / "step_4").named_parameters())
    scales = load_file(str(tmp_path / "step_4" / "extra_state.safetensors"))
    fmt = IntAffine(4, True, 32)
    block_scales = [name for name in scales if name.startswith("layers.") and name.endswith(".scale")]
    assert len(block_scales) == 14
    for scale_name in block_scales:
        name = scale_name.replace("weight_range_learner.scale", "weight")
        half = loaded[name].shape[0] // 2
        for rows in (slice(None, half), slice(half, None)):  # rank 0's rows and rank 1's
            assert not torch.equal(trained[name][rows], loaded[name][rows]), name
        expected, _ = fmt.covering_qparams(loaded[name])
        assert torch.equal(scales[scale_name], expected.reshape(scales[scale_name].shape)), name
    # rank 0 calibrates on the global batches, so one process with the same global batch rounds alike
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path / 'one'}", "batch_size=4",
            *GPTQ_START[:-1], "fake_quant_after_n_steps=2", *start, *small)
    alone = dict(load_model(tmp_path / "one" / "step_4").named_parameters())
    assert all(torch.equal(alone[name], trained[name]) for name in trained)


def test_two_processes_keep_rank0s_gptq_scales(qat_run, tmp_path):
    """Only rank 0 loads and rounds; rank 1 receives the latents and the scales when the model is sharded
    and must not initialise its rows of the scales again when fake quantization turns on (step 0)."""
    from safetensors.torch import load_file

    from qattune.checkpoint import load_model
    from qattune.quant.formats import IntAffine

    start = ["checkpointer={_component_: qattune.checkpoint.HFCheckpointer, "
             f"checkpoint_dir: {qat_run / 'step_4'}, output_dir: ${{output_dir}}}}", "+quantizer.range_init=cover",
             "range_learning_lr=0", "max_steps_per_epoch=4", "save_every_n_steps=null"]
    small = [o for o in SMALL if not o.startswith(("batch_size", "save_every", "max_steps"))]
    two = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path}", "batch_size=2",
                  *GPTQ_START, *start, *small, nproc=2)
    assert two.stdout.count("GPTQ rounding: 14 layers") == 1
    scales = load_file(str(tmp_path / "step_4" / "extra_state.safetensors"))
    weights = dict(load_model(qat_run / "step_4").named_parameters())
    fmt = IntAffine(4, True, 32)
    block_scales = [name for name in scales if name.startswith("layers.") and name.endswith(".scale")]
    assert len(block_scales) == 14
    for name in block_scales:
        expected, _ = fmt.covering_qparams(weights[name.replace("weight_range_learner.scale", "weight")])
        assert torch.equal(scales[name], expected.reshape(scales[name].shape)), name


def test_range_learning_lr_is_the_learned_ranges_own_rate_through_the_schedule(tmp_path):
    out = tmp_path / "ranges"
    small = [o for o in SMALL if not o.startswith(("save_every", "max_steps"))]
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", "max_steps_per_epoch=3",
            "+quantizer.range_learning=true", "range_learning_lr=1e-6", "fake_quant_after_n_steps=1", *small)
    state = torch.load(out / "step_3" / "recipe_state.pt", weights_only=False)
    weights, ranges = state["optimizer"]["param_groups"]
    assert (weights["initial_lr"], ranges["initial_lr"]) == (3e-3, 1e-6)
    assert ranges["lr"] / ranges["initial_lr"] == pytest.approx(weights["lr"] / weights["initial_lr"])
    assert len(ranges["params"]) == 15  # one scale per quantized Linear


def test_qat_lora_trains_adapters_saves_peft_and_resumes(tmp_path):
    out = tmp_path / "lora"
    small = [o for o in SMALL if not o.startswith("save_every")] + ["save_every_n_steps=4"]
    run_cli("qat_lora", "--config", "tiny/qat_lora", f"output_dir={out}", *small)
    rows = metrics(out)
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"] - 0.5
    step = out / "step_8"
    config = json.loads((step / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    assert config["base_model_name_or_path"] is None  # a fresh base: nothing to name
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    from safetensors import safe_open

    with safe_open(str(step / "model.safetensors"), "pt") as f:  # the merged model has plain names
        assert not [k for k in f.keys() if "lora" in k]
    info = json.loads((step / "qattune_training.json").read_text())
    assert info["quantizer"]["scheme"] == "8da4w" and info["lora"]["lora_rank"] == 8

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "step_4", resumed / "step_4")
    run_cli("qat_lora", "--config", "tiny/qat_lora", f"output_dir={resumed}", "resume_from_checkpoint=true", *small)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in rows[4:]]


# plain LoRA: with a fake-quantized base, 2 processes' rounding flips would move the adapters apart
ADAPTER_ONLY = [o for o in SMALL if not o.startswith("max_steps")] + ["max_steps_per_epoch=4", "~quantizer",
                                                                      "save_adapter_weights_only=true"]


@pytest.fixture(scope="module")
def adapter_only_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter_only") / "lora"
    run_cli("qat_lora", "--config", "tiny/qat_lora", f"output_dir={out}", *ADAPTER_ONLY)
    return out


def test_qat_lora_adapter_names_the_hugging_face_folder_it_was_trained_on(qat_run, tmp_path):
    """So PEFT's AutoPeftModelForCausalLM finds the base model."""
    start = ["checkpointer={_component_: qattune.checkpoint.HFCheckpointer, "
             f"checkpoint_dir: {qat_run / 'step_4'}, output_dir: ${{output_dir}}}}"]
    small = [o for o in SMALL if not o.startswith(("max_steps", "save_every"))]
    run_cli("qat_lora", "--config", "tiny/qat_lora", f"output_dir={tmp_path}", "max_steps_per_epoch=1", *start, *small)
    config = json.loads((tmp_path / "step_1" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(qat_run / "step_4")


def test_qat_lora_saves_adapter_weights_only_and_resumes_from_them(tmp_path, adapter_only_run):
    small = ADAPTER_ONLY
    step = adapter_only_run / "step_2"
    assert sorted(p.name for p in step.iterdir()) == ["adapter", "qattune_training.json", "recipe_state.pt"]
    assert (step / "adapter" / "adapter_model.safetensors").is_file()
    (tmp_path / "resumed").mkdir()
    shutil.copytree(step, tmp_path / "resumed" / "step_2")
    run_cli("qat_lora", "--config", "tiny/qat_lora", f"output_dir={tmp_path / 'resumed'}", "resume_from_checkpoint=true",
            *small)
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [r["loss"] for r in metrics(adapter_only_run)[2:]]
    proc = run_cli("quantize", "--config", "tiny/quantize", f"checkpoint_dir={step}", f"output_dir={tmp_path / 'q'}",
                   returncode=2)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {step} holds only a LoRA adapter (qat_lora's save_adapter_weights_only: true); quantize needs the "
        "merged model, which qat_lora writes with save_adapter_weights_only=false")


def test_qat_lora_adapter_only_under_torchrun_equals_one_process(tmp_path, adapter_only_run):
    """The sharded adapters are gathered before rank 0 writes them (they were meta tensors: a crash);
    2 processes of batch 2 train as 1 of batch 4."""
    from safetensors.torch import load_file

    run_cli("qat_lora", "--config", "tiny/qat_lora", f"output_dir={tmp_path}", *ADAPTER_ONLY, "batch_size=2", nproc=2)
    for step in ("step_2", "step_4"):
        assert sorted(p.name for p in (tmp_path / step).iterdir()) == ["adapter", "qattune_training.json",
                                                                       "recipe_state.pt"]
        two, one = (load_file(run / step / "adapter" / "adapter_model.safetensors") for run in (tmp_path, adapter_only_run))
        assert two.keys() == one.keys() and all(torch.allclose(two[k], one[k], atol=1e-5) for k in one)


@pytest.mark.parametrize("qlora", [["base_quantizer={_component_: qattune.quant.PTQQuantizer, scheme: nf4}"],
                                   ["+model.quantize_base=true"]], ids=["base_quantizer", "torchtune_qlora_builder"])
def test_qlora_trains_over_a_real_nf4_base(tmp_path, qlora):
    """QLoRA from a base_quantizer, or from a model builder with quantize_base (torchtune's qlora_*)."""
    out = tmp_path / "qlora"
    small = [o for o in SMALL if not o.startswith(("save_every", "max_steps"))]
    run_cli("qat_lora", "--config", "tiny/qat_lora", f"output_dir={out}", "~quantizer", "max_steps_per_epoch=3",
            *qlora, *small)
    assert len(metrics(out)) == 3
    info = json.loads((out / "step_3" / "qattune_training.json").read_text())
    # nf4 is the base's training-memory format: the merged float model quantizes to any scheme
    assert info["base_quantizer"]["scheme"] == "nf4" and "quantizer" not in info
    assert (out / "step_3" / "adapter" / "adapter_model.safetensors").is_file()
    run_cli("quantize", "--config", "tiny/quantize", f"checkpoint_dir={out / 'step_3'}", f"output_dir={tmp_path / 'q'}")
    assert json.loads((tmp_path / "q" / "quantized" / "config.json").read_text())["quantization_config"]["scheme"] == "8da4w"


DISTILL = ["loss={_component_: qattune.training.DistillationLoss, kd_weight: 0.5}", "fake_quant_after_n_steps=4",
           "teacher_snapshot=fake_quant_start"]


def _norms(path: Path) -> list[tuple]:
    """Every tensor's shape and squared norm, sorted: equal for the same weights under any naming or
    head permutation (a training checkpoint uses HF names, a teacher snapshot qattune's)."""
    from safetensors.torch import load_file

    return sorted((tuple(t.shape), round(float(t.double().square().sum()), 6)) for t in load_file(str(path)).values())


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "run"
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *DISTILL, *SMALL)
    return out


def test_teacher_snapshot_is_the_float_model_when_fake_quant_turns_on(distill_run):
    assert not (distill_run / "step_4" / "teacher.safetensors").exists()
    snapshot = _norms(distill_run / "step_6" / "teacher.safetensors")
    assert _norms(distill_run / "step_8" / "teacher.safetensors") == snapshot
    # the teacher is the student after the 4 float steps (tied embedding/head counted once there)
    student_at_4 = _norms(distill_run / "step_4" / "model.safetensors")
    assert set(snapshot) == set(student_at_4)
    assert set(snapshot) != set(_norms(distill_run / "step_8" / "model.safetensors"))


@pytest.mark.parametrize("resume_step", [2, 6])
def test_distillation_resume_restores_the_teacher_snapshot(distill_run, tmp_path, resume_step):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(distill_run / f"step_{resume_step}", out / f"step_{resume_step}")
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *DISTILL, "resume_from_checkpoint=true",
            *SMALL)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(distill_run)[resume_step:]]


def test_distillation_from_the_start_differs_and_a_missing_snapshot_is_refused(distill_run, qat_run, tmp_path):
    start = tmp_path / "start"
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={start}", *DISTILL[:2], *SMALL)
    snapshot, from_start = metrics(distill_run), metrics(start)
    # before its snapshot exists there is no teacher: the float phase is plain cross entropy, step for step
    # the run without distillation (the same seed and fake_quant_after_n_steps=4)
    assert [r["loss"] for r in snapshot[:4]] == [r["loss"] for r in metrics(qat_run)[:4]]
    # from the start the teacher is the student's own starting point: no KL at first, half the cross entropy
    assert from_start[0]["loss"] == pytest.approx(0.5 * snapshot[0]["loss"], rel=1e-5)
    assert from_start[4]["loss"] != snapshot[4]["loss"]
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copytree(start / "step_6", broken / "step_6")
    proc = subprocess.run([sys.executable, "-m", "qattune.cli.main", "run", "qat_distributed", "--config",
                           "tiny/qat_full", f"output_dir={broken}", *DISTILL, "resume_from_checkpoint=true", *SMALL],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "was saved at step 6, after the teacher snapshot at step 4, but holds no teacher.safetensors; resume with "
        "the teacher_snapshot the run was started with")


def test_teacher_from_another_checkpoint(distill_run, qat_run, tmp_path):
    """teacher_checkpoint_dir: distil from another run's float model (here the plain QAT run's last step);
    the first step's KL term is then nonzero, unlike with a copy of the student's own start."""
    out = tmp_path / "other"
    kd = ["loss={_component_: qattune.training.DistillationLoss, kd_weight: 1.0}", "fake_quant_after_n_steps=4"]
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={out}", *kd,
            f"teacher_checkpoint_dir={qat_run / 'step_8'}", *SMALL)
    assert metrics(out)[0]["loss"] > 0.1
    own = tmp_path / "own"
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={own}", *kd, *SMALL)
    assert metrics(own)[0]["loss"] == pytest.approx(0.0, abs=1e-5)
    for extra, message in [
        ([f"teacher_checkpoint_dir={tmp_path}"], f"teacher_checkpoint_dir={tmp_path}: no config.json there; name a "
                                                 "Hugging Face model folder, such as a full_finetune output's step_N"),
        ([f"teacher_checkpoint_dir={qat_run / 'step_8'}", "teacher_snapshot=fake_quant_start"],
         "teacher_checkpoint_dir and teacher_snapshot=fake_quant_start both name the teacher; set one of them"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "qattune.cli.main", "run", "qat_distributed", "--config",
                               "tiny/qat_full", f"output_dir={tmp_path / 'bad'}", *kd, *extra, *SMALL],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(message), proc.stderr[-500:]


@pytest.mark.parametrize("gptq", [[], ["+quantizer.rounding_init=gptq"]], ids=["range_learning", "gptq"])
def test_qat_lora_refuses_training_the_frozen_base_quantization(tmp_path, gptq):
    """The scales and roundings belong to the frozen base: qat_lora would ignore them (it did, silently)."""
    proc = run_cli("qat_lora", "--config", "tiny/qat_lora", f"output_dir={tmp_path / 'out'}",
                   "+quantizer.range_learning=true", *gptq, returncode=2)
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: quantizer.range_learning=true trains the base model's quantization, which qat_lora keeps frozen "
        "(only the adapters train): remove it, or train the whole model with qat_distributed")
    assert not (tmp_path / "out").exists()


def test_torchaos_qat_quantizer_trains_like_qattunes_8da4w(tmp_path):
    """DESIGN §3: any object with prepare/convert may be the quantizer. torchao's 8da4w QAT has no
    set_fake_quant, so it fake-quantizes from the start; qattune's, from the start too, gives its losses."""
    pytest.importorskip("torchao.quantization.qat")
    small = [o for o in SMALL if not o.startswith("max_steps")] + ["max_steps_per_epoch=3", "fake_quant_after_n_steps=null"]
    torchao = ["quantizer._component_=torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer",
               "~quantizer.scheme", "~quantizer.group_size", "+quantizer.groupsize=32"]
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path / 'torchao'}", *torchao, *small)
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path / 'qattune'}", *small)
    theirs, ours = ([r["loss"] for r in metrics(tmp_path / run)] for run in ("torchao", "qattune"))
    assert theirs[0] == ours[0] and theirs == pytest.approx(ours, abs=1e-3)
    info = json.loads((tmp_path / "torchao" / "step_3" / "qattune_training.json").read_text())
    assert info["quantizer"] == {"component": "Int8DynActInt4WeightQATQuantizer"}


@pytest.mark.parametrize("builder", ["qattune.models.lora_llama3_2_1b", "torchtune.models.llama3_2.lora_llama3_2_1b"])
def test_a_lora_builder_in_a_whole_model_recipe_names_qat_lora(tmp_path, builder):
    """`qattune cp smollm2/135M_qat_full` then a lora_* model: point at qat_lora before any weight is read."""
    proc = run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={tmp_path}",
                   f"model={{_component_: {builder}, lora_attn_modules: [q_proj]}}", returncode=2)
    plain = builder.rsplit(".", 1)[1].removeprefix("lora_")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: model {builder} builds LoRA adapters, which the qat_lora recipe trains (qattune run qat_lora "
        f"--config ...); to train the whole model here, use the plain builder ({plain})")
