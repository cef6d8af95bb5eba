"""The lm-eval adapter: loglikelihoods against direct computation, local multiple-choice and perplexity
tasks through `lm_eval.simple_evaluate`, generate_until, and the task-name errors."""

import copy
import json
import math
import re

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from eval_reference import continuation_logprob, continuation_score, token_logprob  # noqa: E402
from gen_tiny import ByteChatTokenizer, tiny_model  # noqa: E402
from qattune.errors import QattuneError  # noqa: E402
from qattune.eval import check_tasks, lm_eval_model, run_lm_eval  # noqa: E402
from qattune.eval.lm_eval_tasks import _collect  # noqa: E402
from qattune.generation import generate  # noqa: E402

MC_DOCS = [
    {"question": "2 + 2", "choices": ["4", "five", "22"], "answer": 0},
    {"question": "colour of the sky", "choices": ["green", "blue"], "answer": 1},
    {"question": "capital of France", "choices": ["Lyon", "Paris", "Nice", "a big city"], "answer": 1},
    {"question": "opposite of up", "choices": ["down", "sideways"], "answer": 0},
    {"question": "first letter", "choices": ["z", "a", "q"], "answer": 1},
]
PPL_DOCS = [{"text": "Python is a programming language.\nIt has classes."},
            {"text": "short"},
            {"text": "for i in range(10):\n    print(i * i)  # squares of the first ten numbers"}]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return ByteChatTokenizer()


def enc(tokenizer, text):
    return tokenizer.encode(text, add_bos=False, add_eos=False)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_equals_direct_computation(model, tokenizer):
    lm = lm_eval_model(model, tokenizer, batch_size=2)
    pairs = [("Question: 2 + 2\nAnswer:", " 4"), ("The sky is ", "blue"), ("", "empty context"), ("abc", "d")]
    got = lm.loglikelihood([request("loglikelihood", *p) for p in pairs])
    bos = tokenizer.bos_id
    expected_contexts = [[bos, *enc(tokenizer, "Question: 2 + 2\nAnswer:")], [bos, *enc(tokenizer, "The sky is")],
                         [bos], [bos, *enc(tokenizer, "abc")]]
    expected_continuations = [enc(tokenizer, " 4"), enc(tokenizer, " blue"), enc(tokenizer, "empty context"),
                              enc(tokenizer, "d")]
    for (logprob, greedy), ctx, cont in zip(got, expected_contexts, expected_continuations):
        assert (logprob, greedy) == (pytest.approx(continuation_logprob(model, ctx, cont), rel=1e-5, abs=1e-5),
                                     continuation_score(model, ctx, cont)[1])


def test_loglikelihood_truncates_on_the_left_to_max_length(model, tokenizer):
    lm = lm_eval_model(model, tokenizer, max_length=6)
    (logprob, _), = lm.loglikelihood([request("loglikelihood", "0123456789", "ab")])
    sequence = [tokenizer.bos_id, *enc(tokenizer, "0123456789ab")][-7:]  # 6 model inputs + the last target
    assert logprob == pytest.approx(continuation_logprob(model, sequence[:-2], sequence[-2:]), rel=1e-5)


def test_greedy_flag_is_true_for_the_models_own_continuation(model, tokenizer):
    ascii_only = copy.deepcopy(model)
    with torch.no_grad():  # logit 0 for every id but printable ASCII bytes, so greedy text round-trips
        printable = torch.zeros(ascii_only.output.weight.shape[0], dtype=torch.bool)
        printable[[b + 5 for b in range(32, 127)]] = True
        ascii_only.output.weight[~printable] = 0.0
    lm = lm_eval_model(ascii_only, tokenizer)
    own = generate(ascii_only, [[tokenizer.bos_id, *enc(tokenizer, "hello")]], 3).tokens[0]
    text = tokenizer.decode(own)
    assert enc(tokenizer, text) == own
    (_, greedy), (_, not_greedy) = lm.loglikelihood([request("loglikelihood", "hello", text),
                                                     request("loglikelihood", "hello", text[:2] + "\x7f")])
    assert greedy and not not_greedy


def rolling_reference(model, tokenizer, text, max_length):
    """lm-eval's rolling windows by hand: the first window predicts tokens 0..L-1 after the prefix token;
    each later chunk of up to L tokens ending at e reads the L inputs that end just before token e-1."""
    tokens = enc(tokenizer, text)
    seq = [tokenizer.bos_id, *tokens]
    total, start = 0.0, 0
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        first_input = 0 if start == 0 else end - max_length
        for j in range(start, end):
            total += token_logprob(model, seq[first_input : j + 1], tokens[j])
        start = end
    return total


def write_task(tmp_path, name, docs, body):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir(exist_ok=True)
    header = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (task_dir / f"{name}.yaml").write_text(header + body)
    return task_dir


MC_YAML = """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

PPL_YAML = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def test_local_multiple_choice_and_perplexity_tasks_through_simple_evaluate(model, tokenizer, tmp_path):
    write_task(tmp_path, "qt_mc", MC_DOCS, MC_YAML)
    task_dir = write_task(tmp_path, "qt_ppl", PPL_DOCS, PPL_YAML)
    lm = lm_eval_model(model, tokenizer, batch_size=4, max_length=16)
    results = run_lm_eval(lm, ["qt_mc", "qt_ppl"], task_dirs=[str(task_dir)], include_default_tasks=False,
                          bootstrap_iters=0)

    correct = correct_norm = 0
    for doc in MC_DOCS:
        context = [tokenizer.bos_id, *enc(tokenizer, f"Question: {doc['question']}\nAnswer:")]
        scores = [continuation_logprob(model, context, enc(tokenizer, " " + c)) for c in doc["choices"]]
        normed = [s / len((" " + c).encode()) for s, c in zip(scores, doc["choices"])]
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == doc["answer"]
    assert set(results.metrics) == {"qt_mc", "qt_ppl"}
    assert set(results.metrics["qt_mc"]) == {"acc", "acc_norm"}  # no sample_len, name or alias
    assert results.metrics["qt_mc"]["acc"] == pytest.approx(correct / len(MC_DOCS))
    assert results.metrics["qt_mc"]["acc_norm"] == pytest.approx(correct_norm / len(MC_DOCS))
    assert results.higher_is_better["qt_mc"] == {"acc": True, "acc_norm": True}

    logprobs = [rolling_reference(model, tokenizer, d["text"], 16) for d in PPL_DOCS]
    words = sum(len(re.split(r"\s+", d["text"])) for d in PPL_DOCS)
    size = sum(len(d["text"].encode()) for d in PPL_DOCS)
    assert any(len(enc(tokenizer, d["text"])) > 2 * 16 for d in PPL_DOCS)  # several rolling windows
    ppl = results.metrics["qt_ppl"]
    assert ppl["word_perplexity"] == pytest.approx(math.exp(-sum(logprobs) / words), rel=1e-4)
    assert ppl["bits_per_byte"] == pytest.approx(-sum(logprobs) / size / math.log(2), rel=1e-4)
    assert results.flat()["qt_ppl/byte_perplexity"] == pytest.approx(2 ** ppl["bits_per_byte"], rel=1e-6)
    assert results.flat_higher_is_better()["qt_ppl/word_perplexity"] is False


def test_generate_until_cuts_at_the_stop_string(model, tokenizer):
    lm = lm_eval_model(model, tokenizer, batch_size=2)
    contexts = ["Once upon a time", "x"]
    free = [tokenizer.decode(t) for t in
            generate(model, [[tokenizer.bos_id, *enc(tokenizer, c)] for c in contexts], 12,
                     stop_tokens=tokenizer.stop_tokens).tokens]
    stop = free[0][3:5] if len(free[0]) >= 5 else "\x00never"
    out = lm.generate_until([request("generate_until", c, {"until": [stop], "max_gen_toks": 12}) for c in contexts])
    assert out == [f[: f.find(stop)] if stop in f else f for f in free]
    assert out[0] != free[0] or stop == "\x00never"


def test_generation_kwargs_are_read_as_lm_eval_normalizes_them():
    from qattune.eval.lm_eval_adapter import GenerationSettings, generation_settings

    # limit aliases in lm-eval's priority order; a temperature alone samples; do_sample=false is greedy
    assert generation_settings({"until": "\n", "max_new_tokens": 3}, 256, 512) == GenerationSettings(["\n"], 3, 0.0, None, None)
    assert generation_settings({"max_tokens": 9, "max_gen_toks": 4}, 256, 512).max_new_tokens == 4
    assert generation_settings({"temperature": 0.7}, 256, 512).temperature == 0.7
    assert generation_settings({"temperature": 0.7, "do_sample": False, "num_beams": 1}, 16, 512).temperature == 0.0
    assert generation_settings({"do_sample": True, "temperature": 1.0, "top_k": "5", "top_p": 0.9}, 16, 512)[3:] == (5, 0.9)
    with pytest.raises(QattuneError, match=re.escape(
            "a task's generation_kwargs ['num_beams', 'repetition_penalty'] cannot be honoured by qattune's "
            "generate_until, which reads until, max_gen_toks, max_new_tokens, max_tokens, max_completion_tokens, "
            "do_sample, temperature, top_k, top_p")):
        generation_settings({"num_beams": 4, "repetition_penalty": 1.1}, 16, 512)
    with pytest.raises(QattuneError, match=re.escape(
            "a task generates up to 256 tokens (max_gen_toks), which leaves no room for its prompt in "
            "max_seq_length=256: raise max_seq_length, or lower the task's max_gen_toks")):
        generation_settings({}, 256, 256)


def test_generate_until_honours_max_new_tokens_and_warns_when_it_cuts_prompts(model, tokenizer, caplog):
    lm = lm_eval_model(model, tokenizer, batch_size=2, max_length=32)
    long_context = "a fairly long prompt that will not fit " * 2
    with caplog.at_level("WARNING"):
        out = lm.generate_until([request("generate_until", c, {"max_new_tokens": 3}) for c in ("x", long_context)])
    expected = generate(model, [[tokenizer.bos_id, *enc(tokenizer, c)][-29:] for c in ("x", long_context)], 3,
                        stop_tokens=tokenizer.stop_tokens).tokens
    assert out == [tokenizer.decode(t) for t in expected] and all(len(t) <= 3 for t in expected)
    assert "prompts longer than 29 tokens (max_seq_length 32 - max_gen_toks 3) keep their last 29 tokens" in caplog.text


def test_unknown_task_name_is_one_line(model, tokenizer, tmp_path):
    task_dir = write_task(tmp_path, "qt_mc", MC_DOCS, MC_YAML)
    lm = lm_eval_model(model, tokenizer)
    with pytest.raises(QattuneError) as err:
        run_lm_eval(lm, ["qt_mcc"], task_dirs=[str(task_dir)], include_default_tasks=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("lm-eval task 'qt_mcc' is unknown (1 known tasks, task dirs ")
    assert "did you mean 'qt_mc'?" in message and "network" in message and "local task dir" in message


def test_local_tasks_alone_skip_indexing_lm_evals_own(tmp_path):
    """Indexing lm-eval's ~13,000 built-in task YAMLs takes 10+ s; tasks all found in task_dirs need none of
    them. A group (which may name built-in tasks) or a name found elsewhere still gets the whole index."""
    task_dir = write_task(tmp_path, "qt_mc", MC_DOCS, MC_YAML)
    (task_dir / "group.yaml").write_text("group: qt_group\ntask:\n  - qt_mc\n")
    assert check_tasks(["qt_mc"], [str(task_dir)]).all_tasks == ["qt_group", "qt_mc"]
    for names in (["qt_group"], ["qt_mc", "lambada_openai"]):
        everything = check_tasks(names, [str(task_dir)]).all_tasks
        assert "lambada_openai" in everything and "qt_mc" in everything and len(everything) > 1000


def test_lm_evals_git_probe_prints_nothing_outside_a_repository(model, tokenizer, tmp_path, monkeypatch, capfd):
    task_dir = write_task(tmp_path, "qt_mc", MC_DOCS, MC_YAML)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    results = run_lm_eval(lm_eval_model(model, tokenizer), ["qt_mc"], task_dirs=[str(task_dir)], limit=2,
                          bootstrap_iters=0)
    assert set(results.metrics["qt_mc"]) == {"acc", "acc_norm"}
    assert "not a git repository" not in capfd.readouterr().err


def test_hub_task_offline_says_it_needs_network(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task_dir = tmp_path / "hub_tasks"
    task_dir.mkdir()
    (task_dir / "remote.yaml").write_text(
        "task: qt_remote\ndataset_path: qattune-tests/no-such-dataset\noutput_type: loglikelihood_rolling\n"
        "test_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    lm = lm_eval_model(model, tokenizer)
    with pytest.raises(QattuneError) as err:
        run_lm_eval(lm, ["qt_remote"], task_dirs=[str(task_dir)], include_default_tasks=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("lm-eval tasks qt_remote need data from the network that is not cached")
    assert message.endswith("use a local task dir (dataset_path: json + data_files)")


def test_results_keep_only_metrics_and_their_directions():
    """lm-eval 0.4.x puts bookkeeping numbers (sample_len) beside the `metric,filter` entries."""
    raw = {"results": {"qt_gen": {"name": "qt_gen", "alias": "qt_gen", "sample_len": 3,
                                  "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.25,
                                  "exact_match,none": 0.75, "exact_match_stderr,none": "N/A"},
                       "qt_ppl": {"alias": "qt_ppl", "sample_len": 2, "bits_per_byte,none": 1.5,
                                  "word_perplexity,none": 9.0, "word_perplexity_stderr,none": "N/A"}},
           "higher_is_better": {"qt_gen": {"exact_match": True},
                                "qt_ppl": {"bits_per_byte": False, "word_perplexity": False}}}
    results = _collect(raw)
    assert results.flat() == {"qt_gen/exact_match,strict-match": 0.5, "qt_gen/exact_match": 0.75,
                              "qt_ppl/bits_per_byte": 1.5, "qt_ppl/word_perplexity": 9.0}
    assert results.stderr == {"qt_gen": {"exact_match,strict-match": 0.25}}
    assert results.flat_higher_is_better() == {"qt_gen/exact_match,strict-match": True, "qt_gen/exact_match": True,
                                               "qt_ppl/bits_per_byte": False, "qt_ppl/word_perplexity": False}
