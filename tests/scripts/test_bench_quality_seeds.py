"""scripts/bench_quality.py --seeds: the recovered share summarised over seeds."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_quality.py"


@pytest.fixture(scope="module")
def bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(qat_share: float, ptq_gptq_share: float) -> dict:
    return {"8da4w": {"perplexity": {"bf16": 8.9, "ptq": 13.2, "qat_gptq": 9.7},
                      "recovered_share": {"qat_gptq": qat_share, "ptq_gptq": ptq_gptq_share}}}


def test_summary_gives_each_variants_mean_min_and_max_over_the_seeds(bench_quality):
    summary = bench_quality.summarize_seeds({0: _results(0.815, 0.615), 1: _results(0.804, 0.60),
                                             2: _results(0.719, 0.63)})
    # standard error: sample standard deviation / sqrt(seeds); ptq_gptq: sqrt((0.015^2 + 0 + 0.015^2) / 2) / sqrt(3)
    assert summary["8da4w"]["qat_gptq"] == {"mean": 0.7793, "min": 0.719, "max": 0.815, "standard_error": 0.0303,
                                            "seeds": 3}
    assert summary["8da4w"]["ptq_gptq"] == {"mean": 0.615, "min": 0.6, "max": 0.63, "standard_error": 0.0087,
                                            "seeds": 3}


def test_a_seed_without_a_share_is_left_out_of_the_summary(bench_quality):
    """A share is None where PTQ lost nothing beyond noise on that seed."""
    summary = bench_quality.summarize_seeds({0: _results(0.815, None), 1: _results(0.804, 0.60)})
    assert summary["8da4w"]["ptq_gptq"] == {"mean": 0.6, "min": 0.6, "max": 0.6, "standard_error": None, "seeds": 1}
    assert summary["8da4w"]["qat_gptq"]["seeds"] == 2


def test_seeds_default_to_one_run_at_seed_0(bench_quality, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench_quality, "_run_seed", lambda root, seed, args, minutes: calls.append((root, seed)) or {})
    monkeypatch.setattr("sys.argv", ["bench_quality.py", "--output-dir", str(tmp_path)])
    bench_quality.main()
    assert calls == [(tmp_path.resolve(), 0)]
    calls.clear()
    monkeypatch.setattr("sys.argv", ["bench_quality.py", "--output-dir", str(tmp_path), "--seeds", "0", "3"])
    bench_quality.main()
    assert calls == [(tmp_path.resolve(), 0), (tmp_path.resolve() / "seed_3", 3)]


def test_qat_gptq_keeps_its_configs_share_of_float_steps(bench_quality):
    # smollm2/135M_qat_gptq: float for 18 of its 24 steps, so 90 of the bench's 120 and 30 of 40; the q4_0
    # recipe inherits that share
    for scheme in ("8da4w", "q4_0"):
        assert bench_quality._variant_overrides("qat_gptq", 120, scheme) == ["fake_quant_after_n_steps=90"]
        assert bench_quality._variant_overrides("qat_gptq", 40, scheme) == ["fake_quant_after_n_steps=30"]


def test_qat_overrides_replace_the_variants_own_setting_of_a_key(bench_quality):
    variant = ["fake_quant_after_n_steps=90", "quantizer.scheme=q4_0", "+quantizer.range_learning=true"]
    extra = ["fake_quant_after_n_steps=60", "quantizer.range_learning=false", "teacher_snapshot=fake_quant_start"]
    assert bench_quality._overridden(variant, extra) == ["quantizer.scheme=q4_0", *extra]
    assert bench_quality._overridden(variant, []) == variant


def test_ptq_gptq_calibrates_as_qat_gptqs_config_does(bench_quality):
    assert bench_quality._gptq_ptq_overrides("8da4w")[-3:] == ["+quantizer.gptq_batches=64",
                                                               "+quantizer.gptq_output_head=true",
                                                               "+quantizer.reconstruction_epochs=1"]
    # its Q8_0 head: no GPTQ
    assert bench_quality._gptq_ptq_overrides("q4_0")[-2:] == ["+quantizer.gptq_batches=256",
                                                             "+quantizer.reconstruction_epochs=1"]


def test_each_held_out_set_gets_its_own_results_and_summary(bench_quality, monkeypatch, tmp_path, capsys):
    by_documents = {0: {"3_documents": _results(0.80, 0.60), "5_documents": _results(0.90, 0.70)},
                    1: {"3_documents": _results(0.84, 0.64), "5_documents": _results(0.86, 0.66)}}
    for seed, share in ((0, 0.5), (1, 0.7)):  # the topics' summary comes from the largest set
        by_documents[seed]["5_documents"]["8da4w"]["per_document"] = {
            "document_4": {"perplexity": {}, "recovered_share": {"qat_gptq": share}}}
    monkeypatch.setattr(bench_quality, "_run_seed", lambda root, seed, args, minutes: by_documents[seed])
    monkeypatch.setattr("sys.argv", ["bench_quality.py", "--output-dir", str(tmp_path), "--seeds", "0", "1",
                                     "--eval-documents", "3", "5"])
    bench_quality.main()
    report = json.loads(capsys.readouterr().out)
    assert report["eval_documents"] == [3, 5]
    assert report["results"]["5_documents"]["8da4w"]["recovered_share"]["qat_gptq"] == 0.90
    assert report["results_by_seed"]["1"]["3_documents"]["8da4w"]["recovered_share"]["qat_gptq"] == 0.84
    over_seeds = report["recovered_share_over_seeds"]
    assert over_seeds["3_documents"]["8da4w"]["qat_gptq"]["mean"] == 0.82
    assert over_seeds["5_documents"]["8da4w"]["qat_gptq"]["mean"] == 0.88
    assert over_seeds["5_documents"]["8da4w"]["ptq_gptq"]["standard_error"] == 0.02  # sd 0.0283 / sqrt(2)
    assert report["recovered_share_per_topic_over_seeds"] == {"8da4w": {"document_4": {"qat_gptq": 0.6}}}


def test_the_first_held_out_set_keeps_the_eval_folder(bench_quality, tmp_path):
    args = argparse.Namespace(eval_documents=[3, 5])
    assert bench_quality._eval_dir(tmp_path, 3, args) == tmp_path / "eval"
    assert bench_quality._eval_dir(tmp_path, 5, args) == tmp_path / "eval_5_documents"


def test_evaluate_reads_totals_and_each_topic_from_the_eval_json(bench_quality, monkeypatch, tmp_path):
    def fake_eval(argv):
        assert "perplexity.per_document=true" in argv and "perplexity.max_documents=2" in argv
        checkpoints = {name: {"perplexity": p, "document_1/perplexity": d1, "document_2/perplexity": d2}
                       for name, p, d1, d2 in (("bf16", 9.0, 8.0, 11.0), ("ptq", 13.0, 12.0, 15.0),
                                               ("qat", 10.0, 9.0, 14.0))}
        shares = {"qat": {"perplexity": 0.75, "document_1/perplexity": 0.75, "document_2/perplexity": 0.25}}
        directions = dict.fromkeys(checkpoints["bf16"], False)
        (tmp_path / "eval_results.json").write_text(json.dumps(
            {"checkpoints": checkpoints, "recovered_share": shares, "higher_is_better": directions}))

    monkeypatch.setattr(bench_quality, "run_command", fake_eval)
    result = bench_quality._evaluate({"bf16": "a", "ptq": "b", "qat": "c"}, tmp_path, 2)
    assert result["perplexity"] == {"bf16": 9.0, "ptq": 13.0, "qat": 10.0}
    assert result["recovered_share"] == {"qat": 0.75}
    assert list(result["per_document"]) == ["document_1", "document_2"]
    assert result["per_document"]["document_2"] == {"perplexity": {"bf16": 11.0, "ptq": 15.0, "qat": 14.0},
                                                    "recovered_share": {"qat": 0.25}}


def test_topics_summary_averages_each_topics_share_over_the_seeds(bench_quality):
    def seed(first: float, second) -> dict:
        results = _results(0.8, 0.6)
        results["8da4w"]["per_document"] = {
            "document_1": {"perplexity": {}, "recovered_share": {"qat_gptq": first, "ptq_gptq": 0.5}},
            "document_2": {"perplexity": {}, "recovered_share": {"qat_gptq": second, "ptq_gptq": 0.4}}}
        return results

    summary = bench_quality.summarize_topics({0: seed(0.9, 0.6), 1: seed(0.8, None), 2: seed(0.7, 0.5)})
    assert summary == {"8da4w": {"document_1": {"qat_gptq": 0.8, "ptq_gptq": 0.5},
                                 "document_2": {"qat_gptq": 0.55, "ptq_gptq": 0.4}}}  # None: nothing to recover
