"""The eval recipe through the CLI: a float and a PTQ checkpoint on a local lm-eval task and perplexity,
checked against direct computation, with named references and lm-eval's standard errors; the checks that
run before any model loads; partial results."""

import json
import runpy
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from eval_reference import continuation_logprob  # noqa: E402
from recipe_cli import BYTES, error_line, run_recipe, write_checkpoint  # noqa: E402
import qattune  # noqa: E402
from qattune.checkpoint import load_model  # noqa: E402
from qattune.config.recipe_main import load_and_validate  # noqa: E402
from qattune.errors import QattuneError  # noqa: E402
from qattune.eval import compare_checkpoints, load_texts, perplexity  # noqa: E402
from qattune.tokenizers import byte_tokenizer  # noqa: E402

MC_DOCS = [
    {"question": "2 + 2", "choices": ["4", "five", "22"], "answer": 0},
    {"question": "colour of the sky", "choices": ["green", "blue"], "answer": 1},
    {"question": "capital of France", "choices": ["Lyon", "Paris", "Nice"], "answer": 1},
    {"question": "opposite of up", "choices": ["down", "sideways"], "answer": 0},
]
TASK = """task: qt_recipe_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
TEXTS = [{"text": "def f(x):\n    return x * 2\n"}, {"text": "The quick brown fox jumps over the lazy dog."}]
RECIPE_FILE = Path(qattune.__file__).parent.parent / "recipes" / "eval.py"


def eval_recipe() -> SimpleNamespace:
    """recipes/eval.py's functions, to call its parts in this process."""
    return SimpleNamespace(**runpy.run_path(str(RECIPE_FILE)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_recipe")
    write_checkpoint(root / "float")
    write_checkpoint(root / "ptq", scheme="8da4w")
    (root / "tasks").mkdir()
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "tasks" / "qt_recipe_mc.yaml").write_text(TASK.format(data=root / "mc.jsonl"))
    (root / "texts.jsonl").write_text("".join(json.dumps(d) + "\n" for d in TEXTS))
    return root


def common(root, out="out"):
    """Options of every run: the byte tokenizer, local texts, 32-token windows, no chart."""
    return [f"output_dir={root / out}", BYTES, f"perplexity.source={root / 'texts.jsonl'}",
            "perplexity.max_seq_len=32", "plot=false"]


def hand_accuracy(model, tokenizer):
    """qt_recipe_mc's acc by direct computation: the choice with the largest log-probability after bos."""
    correct = 0
    for doc in MC_DOCS:
        context = [tokenizer.bos_id, *tokenizer.encode(f"Question: {doc['question']}\nAnswer:", False, False)]
        scores = [continuation_logprob(model, context, tokenizer.encode(" " + c, False, False)) for c in doc["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return correct / len(MC_DOCS)


def test_eval_runs_a_local_task_and_perplexity_on_each_checkpoint(setup):
    root = setup
    # `baseline` and `ptq` name the references; the random float model scores worse than its 8da4w copy,
    # so that copy is the baseline here, and a second copy of it recovers all of the float model's loss
    checkpoints = f"checkpoints={{f: {root / 'float'}, q: {root / 'ptq'}, q_again: {root / 'ptq'}}}"
    proc = run_recipe("eval", "--config", "eval", *common(root), checkpoints, "baseline=q", "ptq=f",
                      "tasks=[qt_recipe_mc]", f"task_dirs=[{root / 'tasks'}]")
    results = json.loads((root / "out" / "eval_results.json").read_text())
    assert list(results["checkpoints"]) == ["f", "q", "q_again"] and results["pending"] == []
    assert (results["baseline"], results["ptq"]) == ("q", "f")
    assert results["higher_is_better"] == {"perplexity": False, "bits_per_byte": False, "nll_per_token": False,
                                           "byte_perplexity": False, "qt_recipe_mc/acc": True}
    tokenizer = byte_tokenizer()
    texts = load_texts(str(root / "texts.jsonl"))
    for name, folder in (("f", "float"), ("q", "ptq")):
        model = load_model(root / folder)
        got = results["checkpoints"][name]
        with torch.no_grad():
            expected = perplexity(model, tokenizer, texts, max_seq_len=32)
        assert got["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
        accuracy = hand_accuracy(model, tokenizer)
        assert got["qt_recipe_mc/acc"] == pytest.approx(accuracy)
        # lm-eval's standard error of a mean of 0/1 scores over 4 documents
        stderr = (accuracy * (1 - accuracy) / 3) ** 0.5
        assert results["stderr"][name] == {"qt_recipe_mc/acc": pytest.approx(stderr)}
    assert results["checkpoints"]["f"]["perplexity"] > results["checkpoints"]["q"]["perplexity"] * 1.001
    assert results["recovered_share"]["q_again"]["perplexity"] == pytest.approx(1.0)
    lines = proc.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("metric")):]
    assert table[0].split() == ["metric", "f", "q", "q_again", "q_again", "recovered"]
    assert table[2].split()[-1] == "100.0%"
    assert table[6].split() == ["qt_recipe_mc/acc", "↑", *["0.75", "±", "0.25"] * 3, "n/a"]  # acc: 3 of 4
    assert table[7] == "n/a: PTQ is not worse than the baseline (qt_recipe_mc/acc)"


def test_baseline_and_ptq_name_checkpoints_and_are_checked_before_anything_runs(setup):
    overrides = [*common(setup, "references"), f"checkpoints={{fp32: {setup / 'float'}, ptq: {setup / 'ptq'}}}",
                 "baseline=bf16"]
    with pytest.raises(QattuneError) as err:
        eval_recipe().recipe(load_and_validate("eval", overrides, RECIPE_FILE))
    assert str(err.value) == ("baseline checkpoint 'bf16' is not among the checkpoints (fp32, ptq); "
                              "set baseline to one of them")
    assert not (setup / "references").exists()


def test_three_checkpoints_without_references_get_a_note_naming_the_key_to_set():
    note = eval_recipe()._missing_references_note
    results = {"fp32": {"mc/acc": 0.6}, "ptq": {"mc/acc": 0.4}, "qat": {"mc/acc": 0.5}}
    assert note(compare_checkpoints(results)) == (
        "note: no recovered shares without a baseline and a PTQ checkpoint: set baseline=NAME (the unquantized "
        "one; default: the one named bf16), NAME one of fp32, ptq, qat")
    assert note(compare_checkpoints({"fp32": results["fp32"], "b": results["ptq"], "c": results["qat"]})) == (
        "note: no recovered shares without a baseline and a PTQ checkpoint: set baseline=NAME (the unquantized "
        "one; default: the one named bf16) and ptq=NAME (the PTQ one; default: the one named ptq), NAME one of "
        "fp32, b, c")
    assert note(compare_checkpoints(results, baseline="fp32")) is None
    assert note(compare_checkpoints({"fp32": results["fp32"], "qat": results["qat"]})) is None  # two: no share to miss


def test_a_bad_second_checkpoint_is_found_before_any_model_loads(setup):
    root = setup
    line = error_line("eval", "--config", "eval", *common(root, "bad"),
                      f"checkpoints={{a: {root / 'float'}, b: {root / 'missing'}}}")
    assert line == f"checkpoints.b: checkpoint not found: {root / 'missing'}"
    assert not (root / "bad" / "eval_results.json").exists()


def test_a_failure_part_way_keeps_the_results_before_it(setup, tmp_path):
    """... naming the checkpoints still pending; an earlier run's plot is gone."""
    root = setup
    (root / "partial").mkdir()
    (root / "partial" / "eval_comparison.png").write_bytes(b"an earlier run's chart")
    shutil.copytree(root / "float", tmp_path / "wrong")  # its config no longer fits its tensors
    config = json.loads((tmp_path / "wrong" / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(config))
    line = error_line("eval", "--config", "eval", *common(root, "partial"),
                      f"checkpoints={{a: {root / 'float'}, b: {tmp_path / 'wrong'}}}")
    assert line.startswith(f"b: {tmp_path / 'wrong'}: tensor 'model.layers.0.mlp.gate_proj.weight'")
    assert line.endswith(f"(the results of a are in {root / 'partial' / 'eval_results.json'})")
    kept = json.loads((root / "partial" / "eval_results.json").read_text())
    assert list(kept["checkpoints"]) == ["a"] and kept["checkpoints"]["a"]["perplexity"] > 1
    assert kept["pending"] == ["b"]
    assert sorted(p.name for p in (root / "partial").iterdir()) == ["eval_results.json"]


def test_an_unknown_task_is_found_before_any_model_loads(setup):
    root = setup
    proc = run_recipe("eval", "--config", "eval", *common(root, "task"), f"checkpoint_dir={root / 'float'}",
                      "tasks=[qt_recipe_mcc]", f"task_dirs=[{root / 'tasks'}]", returncode=2)
    assert "Evaluating" not in proc.stdout
    assert f"task dirs {root / 'tasks'}); did you mean 'qt_recipe_mc'?" in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    (["perplexity.source=python_docs", "perplexity.split=test"],
     "perplexity.split=test: python_docs split must be 'train' or 'validation', got 'test'"),
    (["perplexity.max_documents=0"], "perplexity.max_documents=0 must be a whole number >= 1 (or null: every document)"),
    (["perplexity.max_seq_len=512"],
     "perplexity windows of max_seq_len=512 tokens are longer than the model's max_seq_len=256: set "
     "perplexity.max_seq_len to at most 256 (null: the model's own) (checkpoint model)"),
])
def test_perplexity_options_are_checked_before_any_model_loads(setup, overrides, message):
    line = error_line("eval", "--config", "eval", *common(setup, "options"), f"checkpoint_dir={setup / 'float'}",
                      *overrides)
    assert line == message


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(setup, tmp_path):
    write_checkpoint(tmp_path / "small", vocab_size=200)
    line = error_line("eval", "--config", "eval", *common(setup, "vocab"), f"checkpoint_dir={tmp_path / 'small'}")
    assert line == (f"checkpoint_dir: tokenizer ids reach 259 but the model's vocab_size is 200 ({tmp_path / 'small'}): "
                    "use the model's tokenizer")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(setup):
    line = error_line("eval", "--config", "eval", *common(setup, "cuda"), f"checkpoint_dir={setup / 'float'}",
                      "device=cuda")
    assert line == "device 'cuda' was requested but no CUDA GPU is visible; set device=cpu"
