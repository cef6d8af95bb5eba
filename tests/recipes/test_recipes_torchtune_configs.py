"""torchtune's own generation, eleuther_evaluation and quantization configs (tests/cli/fixtures, as torchtune
ships them) validated with only the recipe name given, then run through the CLI on a tiny model trained
here, read through their model + checkpointer pair: the same text, numbers and quantized weights as the
same runs of qattune's configs through checkpoint_dir; seed and max_seq_length honoured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qattune.quant import read_quantization_config

FIXTURES = Path(__file__).resolve().parent.parent / "cli" / "fixtures"
TINY_MODEL = ("model={_component_: qattune.models.llama, vocab_size: 260, num_layers: 2, num_heads: 4, num_kv_heads: 2, "
              "embed_dim: 64, intermediate_dim: 192, max_seq_len: 256}")  # tiny/full's model
BYTES = "tokenizer={_component_: qattune.tokenizers.byte_tokenizer}"  # in place of the Llama 3 tokenizer
SAMPLING = ["device=cpu", "dtype=bf16", "temperature=0.6", "top_k=300", "seed=1234"]  # the torchtune config's
LL_DOCS = [{"context": f"Question {i}: what is {i} + {i}?\nAnswer:", "continuation": f" {2 * i}"} for i in range(6)]
LL_TASK = """task: qt_tt_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
num_fewshot: 2
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def qattune(*args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "qattune.cli.main", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == returncode, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def error_line(*args: str) -> str:
    """The one line a refused command prints (exit code 2, no traceback), without its `error: ` prefix."""
    proc = qattune(*args, returncode=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0].removeprefix("error: ")


@pytest.fixture(scope="module")
def step(tmp_path_factory) -> Path:
    """A tiny float model, two steps of tiny/full."""
    out = tmp_path_factory.mktemp("torchtune_configs") / "full"
    qattune("run", "full_finetune", "--config", "tiny/full", f"output_dir={out}", "max_steps_per_epoch=2",
            "progress_bar=false", "run_val_every_n_steps=null")
    return out / "step_2"


def pair(step: Path) -> list[str]:
    """Point the torchtune config's model + checkpointer (FullModelHFCheckpointer, model.safetensors) at `step`."""
    return [f"checkpointer.checkpoint_dir={step}", TINY_MODEL, BYTES, "device=cpu"]


@pytest.mark.parametrize("name, recipe", [("generation", "generate"), ("eleuther_evaluation", "eval"),
                                          ("quantization", "quantize")])
def test_torchtune_configs_validate_with_the_recipe_name_only(name, recipe):
    path = FIXTURES / f"torchtune_{name}.yaml"
    assert qattune("validate", str(path), "--recipe", recipe).stdout == f"Config '{path}' is valid for recipe '{recipe}'.\n"


def generated(proc: subprocess.CompletedProcess) -> str:
    """The prompt and answer a generate run printed (its last line, the speed, left out)."""
    return proc.stdout.rpartition("\n\n")[0]


@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_generation_config_generates_what_checkpoint_dir_does(step, system):
    from qattune.checkpoint import load_model
    from qattune.generation import generate_text
    from qattune.tokenizers import byte_tokenizer

    theirs = [f"prompt.system='{system}'"] if system else []  # torchtune's {system, user} prompt
    ours = [f"system_prompt='{system}'"] if system else []
    proc = qattune("run", "generate", "--config", str(FIXTURES / "torchtune_generation.yaml"), *pair(step),
                   "max_new_tokens=24", *theirs)
    same = qattune("run", "generate", "--config", "generation", f"checkpoint_dir={step}", BYTES, *SAMPLING,
                   "max_new_tokens=24", "prompt='Tell me a joke.'", *ours)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": "Tell me a joke."})
    with torch.no_grad():
        expected = generate_text(load_model(step, dtype=torch.bfloat16), byte_tokenizer(), [messages], 24,
                                 temperature=0.6, top_k=300, seed=1234).texts[0]
    assert generated(proc) == generated(same) == f"> Tell me a joke.\n{expected}"


def test_the_system_message_reaches_the_model(step):
    """Greedy, since the config's seeded sampling draws the same bytes from this near-uniform model either way."""
    texts = [generated(qattune("run", "generate", "--config", str(FIXTURES / "torchtune_generation.yaml"),
                               *pair(step), "max_new_tokens=24", "temperature=0", "~top_k", *system))
             for system in ([], ["prompt.system=Hi"])]
    assert texts[0].startswith("> Tell me a joke.\n") and texts[0] != texts[1]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A local loglikelihood task with two few-shot examples drawn by lm-eval's seed."""
    root = tmp_path_factory.mktemp("torchtune_eval_task")
    (root / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in LL_DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / "qt_tt_ll.yaml").write_text(LL_TASK.format(data=root / "docs.jsonl"))
    return root / "tasks"


def torchtune_eval(step: Path, task_dir: Path, out: Path, *overrides: str) -> dict[str, float]:
    """The torchtune eval config's numbers on the local task (its 4096 tokens exceed the tiny model's 256)."""
    qattune("run", "eval", "--config", str(FIXTURES / "torchtune_eleuther_evaluation.yaml"), *pair(step),
            f"output_dir={out}", "tasks=[qt_tt_ll]", f"task_dirs=[{task_dir}]", *overrides)
    return json.loads((out / "eval_results.json").read_text())["checkpoints"]["model"]


def test_eval_config_scores_what_checkpoint_dir_does(step, task_dir, tmp_path):
    theirs = torchtune_eval(step, task_dir, tmp_path / "theirs", "max_seq_length=24")
    qattune("run", "eval", "--config", "eval", f"checkpoint_dir={step}", BYTES, f"output_dir={tmp_path / 'ours'}",
            "perplexity=null", "tasks=[qt_tt_ll]", f"task_dirs=[{task_dir}]", "device=cpu", "dtype=bf16",
            "batch_size=8", "seed=1234", "max_seq_length=24")
    ours = json.loads((tmp_path / "ours" / "eval_results.json").read_text())["checkpoints"]["model"]
    assert list(theirs) == ["qt_tt_ll/perplexity"] and theirs["qt_tt_ll/perplexity"] > 1
    assert theirs == ours
    whole = torchtune_eval(step, task_dir, tmp_path / "whole", "max_seq_length=256")  # 24: the few-shot cut off
    assert whole != theirs
    assert torchtune_eval(step, task_dir, tmp_path / "seed", "max_seq_length=256", "seed=0") != whole


def test_eval_refuses_a_max_seq_length_beyond_the_model(step, tmp_path):
    line = error_line("run", "eval", "--config", str(FIXTURES / "torchtune_eleuther_evaluation.yaml"), *pair(step),
                      f"output_dir={tmp_path}")
    assert line == ("max_seq_length=4096: lm-eval inputs must be 1 to the model's max_seq_len=256 tokens (checkpoint "
                    "model); set max_seq_length to at most 256 (null: the model's own, at most 2048)")


@pytest.fixture(scope="module")
def quantized(step, tmp_path_factory) -> tuple[Path, int]:
    """torchtune's quantization config run in this process (torch seeded at 0 before): its output folder,
    and torch's seed after the run."""
    from qattune.cli.main import main

    out = tmp_path_factory.mktemp("torchtune_quantized")
    torch.manual_seed(0)
    main(["run", "quantize", "--config", str(FIXTURES / "torchtune_quantization.yaml"), *pair(step),
          f"output_dir={out}", "quantizer.groupsize=32"])  # its 256 does not divide the width 64
    return out / "quantized", torch.initial_seed()


def test_quantization_config_quantizes_what_checkpoint_dir_does(step, quantized, tmp_path):
    folder, seed = quantized
    assert seed == 1234  # the config's seed
    qattune("run", "quantize", "--config", "quantization", f"checkpoint_dir={step}", TINY_MODEL, BYTES,
            "quantizer._component_=qattune.quant.PTQQuantizer", "device=cpu", "dtype=bf16", f"output_dir={tmp_path}")
    theirs = load_file(str(folder / "model.safetensors"))
    ours = load_file(str(tmp_path / "quantized" / "model.safetensors"))
    assert theirs.keys() == ours.keys() and "layers.0.attn.q_proj.weight_packed" in theirs
    for name, tensor in theirs.items():
        assert torch.equal(tensor, ours[name]), name
    config = read_quantization_config(folder)["quantization"]
    assert config == read_quantization_config(tmp_path / "quantized")["quantization"]
    assert (config["scheme"], config["group_size"]) == ("8da4w", 32)


@pytest.mark.parametrize("name, recipe", [("generation", "generate"), ("eleuther_evaluation", "eval")])
@pytest.mark.parametrize("override, message", [
    ("enable_kv_cache=false", "enable_kv_cache=false is not supported: {kv}; remove enable_kv_cache"),
    ("quantizer={_component_: torchtune.training.quantization.Int8DynActInt4WeightQuantizer}",
     "quantizer={{'_component_': 'torchtune.training.quantization.Int8DynActInt4WeightQuantizer'}} is not supported: "
     "{recipe} loads real quantized models: convert the checkpoint with `qattune run quantize`, then set "
     "checkpoint_dir to its output_dir/quantized and remove quantizer"),
])
def test_torchtune_options_qattune_does_not_honour_are_refused_by_validate(name, recipe, override, message):
    kv = {"generate": "qattune always decodes with a KV cache (the same tokens, faster)",
          "eval": "lm-eval's generation tasks always decode with a KV cache here (the same tokens, faster)"}[recipe]
    proc = qattune("validate", str(FIXTURES / f"torchtune_{name}.yaml"), "--recipe", recipe, override, returncode=2)
    assert proc.stderr.splitlines()[1:] == ["  " + message.format(kv=kv, recipe=recipe)]


def test_checkpoint_dir_and_checkpointer_are_one_or_the_other(step, quantized):
    config = str(FIXTURES / "torchtune_generation.yaml")
    assert error_line("run", "generate", "--config", config, *pair(step), f"checkpoint_dir={step}") == (
        f"checkpoint_dir={step} and checkpointer (torchtune's model + checkpointer) both name the checkpoint to "
        "load; keep one: checkpoint_dir=null, or ~checkpointer ~model")
    assert error_line("run", "generate", "--config", config, *pair(step), "~checkpointer") == (
        "model is the builder a checkpointer loads into (torchtune's model + checkpointer), but checkpointer is not "
        "set: set checkpointer, or remove model (~model)")
    folder = quantized[0]
    assert error_line("run", "eval", "--config", str(FIXTURES / "torchtune_eleuther_evaluation.yaml"), *pair(step),
                      f"checkpointer.checkpoint_dir={folder}", f"output_dir={folder.parent / 'eval'}") == (
        f"checkpointer.checkpoint_dir={folder} holds a quantized model (quantization_config.json); model + "
        f"checkpointer read float checkpoints: load it with checkpoint_dir={folder} (and ~checkpointer ~model)")
    assert error_line("run", "eval", "--config", str(FIXTURES / "torchtune_eleuther_evaluation.yaml"), *pair(step),
                      f"checkpoints={{a: {step}}}",
                      f"output_dir={folder.parent / 'eval'}") == (
        "checkpoints names every checkpoint to compare; model + checkpointer cannot add one: add its folder to "
        "checkpoints and remove them (~checkpointer ~model)")


@pytest.mark.parametrize("overrides, message", [
    (["+prompt.usr=hi"], "prompt.usr: unknown key; torchtune's chat prompt is {system: ..., user: ...}. Did you mean "
                        "'user'?"),
    (["prompt.user=''"], "prompt.user is empty; give a text to generate from"),
    (["chat=false"], "prompt={system, user} is a chat prompt: set chat=true, or give prompt as a text"),
    (["prompt.system=Hi", "system_prompt=Hello"],
     "prompt.system and system_prompt both set the system message; keep one"),
])
def test_a_bad_torchtune_prompt_is_one_line(step, overrides, message):
    assert error_line("run", "generate", "--config", str(FIXTURES / "torchtune_generation.yaml"), *pair(step),
                      *overrides) == message
