"""Side-by-side comparison: recovered share (and when there is none), table, JSON and PNG."""

import json
import os
import struct

import pytest

from qattune.errors import QattuneError
from qattune.eval import compare_checkpoints, infer_higher_is_better, plot_comparison, recovered_share
from qattune.eval.compare import format_values, no_share_reason, noise_floor, reference_checkpoints
from qattune.eval.plot import panel_title, y_limits

RESULTS = {
    "bf16": {"python_docs/perplexity": 10.0, "mc/acc": 0.60, "mc/acc_norm": 0.50, "python_docs/bits_per_byte": 1.0},
    "ptq": {"python_docs/perplexity": 14.0, "mc/acc": 0.50, "mc/acc_norm": 0.55, "python_docs/bits_per_byte": 1.2},
    "qat": {"python_docs/perplexity": 11.0, "mc/acc": 0.45, "mc/acc_norm": 0.52, "python_docs/bits_per_byte": 0.9},
    "qat_plain": {"python_docs/perplexity": 16.0, "mc/acc": 0.58},
}


@pytest.mark.parametrize("b, p, q, higher, expected", [
    (10.0, 14.0, 11.0, False, 0.75),   # perplexity: 3 of the 4 points lost are won back
    (10.0, 14.0, 16.0, False, -0.5),   # QAT worse than PTQ: negative share
    (1.0, 1.2, 0.9, False, 1.5),       # QAT better than the baseline: above 1
    (0.60, 0.50, 0.58, True, 0.8),     # accuracy: 0.08 of the 0.10 lost
    (0.60, 0.50, 0.45, True, -0.5),    # accuracy, QAT worse than PTQ
    (0.50, 0.55, 0.52, True, None),    # PTQ did not degrade: nothing to recover
    (10.0, 10.0, 9.0, False, None),
    (12.3456, 12.3489, 12.3301, False, None),  # PTQ lost 0.03% of the baseline: noise, not 570%
    (10.0, 10.0001, 9.0, False, None),         # not 1000100%
    (10.0, 10.011, 10.0, False, 1.0),          # 0.11%: above the floor
])
def test_recovered_share(b, p, q, higher, expected):
    share = recovered_share(b, p, q, higher)
    assert share == (None if expected is None else pytest.approx(expected))


WITHIN_STDERR = "PTQ's loss is within one standard error of the difference"
BELOW_FLOOR = "PTQ's loss is under 0.1% of the baseline value, or under 0.001 on a log scale"


def test_a_ptq_loss_within_noise_has_no_share():
    assert no_share_reason(0.60, 0.58, True, 0.015, 0.015) == WITHIN_STDERR
    assert recovered_share(0.60, 0.58, 0.59, True, 0.015, 0.015) is None  # 0.02 <= sqrt(2) * 0.015
    assert recovered_share(0.60, 0.58, 0.59, True, 0.012, 0.012) == pytest.approx(0.5)  # 0.02 > 0.017
    assert recovered_share(0.60, 0.58, 0.59, True, None, 0.025) is None  # the stderr that is known
    assert no_share_reason(12.3456, 12.3489, False) == BELOW_FLOOR
    assert no_share_reason(0.5, 0.55, True) == "PTQ is not worse than the baseline"
    assert no_share_reason(None, 0.55, True) == "a baseline or PTQ value is missing"


def test_log_scale_metrics_have_the_floor_of_their_perplexity():
    """ln(297.61 / 296.34) = 0.0043: perplexity 0.43% worse, nll 0.075% worse; both get a share."""
    results = {"bf16": {"perplexity": 296.34, "nll_per_token": 5.6915, "bits_per_byte": 8.2111},
               "ptq": {"perplexity": 297.61, "nll_per_token": 5.6958, "bits_per_byte": 8.2173},
               "qat": {"perplexity": 296.34, "nll_per_token": 5.6915, "bits_per_byte": 8.2111}}
    assert compare_checkpoints(results).recovered["qat"] == pytest.approx(
        {"perplexity": 1.0, "nll_per_token": 1.0, "bits_per_byte": 1.0})
    assert noise_floor("nll_per_token", 5.6915) == 1e-3 and noise_floor("perplexity", 296.34) == pytest.approx(0.29634)


NOISY = {"bf16": {"perplexity": 12.3456, "hellaswag/acc": 0.41234},
         "ptq": {"perplexity": 12.3489, "hellaswag/acc": 0.41201},
         "qat": {"perplexity": 12.3301, "hellaswag/acc": 0.4161}}


def test_values_that_differ_print_differently_and_noise_has_no_share():
    assert compare_checkpoints(NOISY).table().splitlines() == [
        "metric             bf16     ptq     qat  qat recovered",
        "---------------  ------  ------  ------  -------------",
        "perplexity ↓     12.346  12.349   12.33            n/a",
        "hellaswag/acc ↑  0.4123   0.412  0.4161            n/a",
        f"n/a: {BELOW_FLOOR} (perplexity, hellaswag/acc)",
    ]


def test_format_values_adds_digits_until_different_values_differ():
    assert format_values([12.3456, 12.3489, 12.3301]) == ["12.346", "12.349", "12.33"]
    assert format_values([22.89, 22.92, 23.06]) == ["22.89", "22.92", "23.06"]
    assert format_values([1.0, 1.0000001, None, 1.0]) == ["1", "1.0000001", "-", "1"]
    assert format_values([1.0, 1.0 + 1e-12]) == ["1", "1"]  # at most 8 significant digits


def test_stderr_is_shown_saved_and_keeps_noise_out(tmp_path):
    results = {**NOISY, "ptq": {"perplexity": 14.0, "hellaswag/acc": 0.40}}
    stderr = {"bf16": {"hellaswag/acc": 0.0123, "unknown/acc": 1.0}, "ptq": {"hellaswag/acc": 0.0121},
              "qat": {"hellaswag/acc": float("nan")}}
    comparison = compare_checkpoints(results, stderr=stderr)
    assert comparison.table().splitlines()[2:] == [
        "perplexity ↓              12.35           14   12.33         100.9%",
        "hellaswag/acc ↑  0.4123 ± 0.012  0.4 ± 0.012  0.4161            n/a",
        f"n/a: {WITHIN_STDERR} (hellaswag/acc)",
    ]
    saved = json.loads(comparison.write_json(tmp_path / "comparison.json").read_text())
    assert saved["stderr"] == {"bf16": {"hellaswag/acc": 0.0123}, "ptq": {"hellaswag/acc": 0.0121}, "qat": {}}
    assert saved["no_share_reason"] == {"hellaswag/acc": WITHIN_STDERR}
    assert saved["recovered_share"]["qat"] == {"perplexity": pytest.approx(1.6699 / 1.6544), "hellaswag/acc": None}
    with pytest.raises(QattuneError, match="^stderr names checkpoint 'int4', which has no results "
                                           "\\(bf16, ptq, qat\\); give standard errors of the compared "
                                           "checkpoints only$"):
        compare_checkpoints(results, stderr={"int4": {}})


def test_reference_checkpoints_are_checked_in_one_line():
    names = ["fp32", "ptq", "qat"]
    assert reference_checkpoints(names) == (None, "ptq")
    assert reference_checkpoints(names, baseline="fp32") == ("fp32", "ptq")
    assert reference_checkpoints(["bf16", "ptq"], defaults=False) == (None, None)
    with pytest.raises(QattuneError, match="^baseline checkpoint 'bf16' is not among the checkpoints "
                                           "\\(fp32, ptq, qat\\); set baseline to one of them$"):
        reference_checkpoints(names, baseline="bf16")
    with pytest.raises(QattuneError, match="^baseline and ptq both name checkpoint 'ptq'; set them to the "
                                           "unquantized and the PTQ checkpoint$"):
        reference_checkpoints(names, baseline="ptq")
    named = compare_checkpoints({"fp32": {"mc/acc": 0.6}, "rtn": {"mc/acc": 0.4}, "bf16": {"mc/acc": 0.5}},
                                ptq="rtn", default_references=False)
    assert named.baseline is None and named.recovered == {}


def test_table_json_and_recovered_per_checkpoint(tmp_path):
    comparison = compare_checkpoints(RESULTS)
    assert comparison.recovered["qat"] == pytest.approx(
        {"python_docs/perplexity": 0.75, "mc/acc": -0.5, "mc/acc_norm": None, "python_docs/bits_per_byte": 1.5})
    assert comparison.recovered["qat_plain"]["python_docs/perplexity"] == pytest.approx(-0.5)
    assert comparison.recovered["qat_plain"]["mc/acc"] == pytest.approx(0.8)
    assert comparison.recovered["qat_plain"]["mc/acc_norm"] is None  # value missing

    lines = comparison.table().splitlines()
    assert lines[0].split() == ["metric", "bf16", "ptq", "qat", "qat_plain",
                                "qat", "recovered", "qat_plain", "recovered"]
    assert lines[2].split() == ["python_docs/perplexity", "↓", "10", "14", "11", "16", "75.0%", "-50.0%"]
    assert lines[3].split() == ["mc/acc", "↑", "0.6", "0.5", "0.45", "0.58", "-50.0%", "80.0%"]
    assert lines[4].split() == ["mc/acc_norm", "↑", "0.5", "0.55", "0.52", "-", "n/a", "n/a"]
    assert lines[6] == "n/a: PTQ is not worse than the baseline (mc/acc_norm)"

    saved = json.loads(comparison.write_json(tmp_path / "out" / "comparison.json").read_text())
    assert saved["baseline"] == "bf16" and saved["ptq"] == "ptq"
    assert saved["checkpoints"]["qat_plain"]["mc/acc_norm"] is None
    assert saved["higher_is_better"] == {"python_docs/perplexity": False, "mc/acc": True, "mc/acc_norm": True,
                                         "python_docs/bits_per_byte": False}
    assert saved["recovered_share"]["qat"]["python_docs/perplexity"] == pytest.approx(0.75)


def test_png_bar_chart(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_comparison(compare_checkpoints(RESULTS), tmp_path / "chart.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR: 4 metrics -> 3 panels of 4x3.2 in per row, 2 rows
    assert (width, height) == (1200, 640)


def test_plot_axes_fit_the_values_and_titles_show_shares_as_the_table():
    low, high = y_limits([22.89, 22.92, 23.06], [None, None, None])  # 0.17 apart: a margin of 0.0425
    assert (low, high) == (pytest.approx(22.8475), pytest.approx(23.1025))
    assert y_limits([0.40, 0.42], [0.01, None]) == (pytest.approx(0.3825), pytest.approx(0.4275))  # error bars fit
    assert y_limits([0.0, 0.25], [None, None]) == (0.0, pytest.approx(0.3125))  # no negative axis for >= 0 values
    assert y_limits([5.0, 5.0], [None, None]) == (pytest.approx(4.95), pytest.approx(5.05))
    assert y_limits([None], [None]) is None
    comparison = compare_checkpoints(RESULTS)
    assert panel_title(comparison, "python_docs/perplexity") == (
        "python_docs/perplexity\n(lower is better)\nrecovered qat: 75.0%, qat_plain: -50.0%")
    assert panel_title(comparison, "mc/acc_norm") == (
        "mc/acc_norm\n(higher is better)\nrecovered qat: n/a, qat_plain: n/a")


def test_directions_and_errors():
    assert infer_higher_is_better("wikitext/word_perplexity") is False
    assert infer_higher_is_better("gsm8k/exact_match,strict-match") is True
    with pytest.raises(QattuneError, match="cannot tell whether higher or lower is better for metric 'x/score'"):
        compare_checkpoints({"bf16": {"x/score": 1.0}})
    explicit = compare_checkpoints({"bf16": {"x/score": 1.0}, "ptq": {"x/score": 3.0}, "qat": {"x/score": 2.0}},
                                   higher_is_better={"x/score": False})
    assert explicit.recovered["qat"]["x/score"] == pytest.approx(0.5)
    with pytest.raises(QattuneError, match="ptq checkpoint 'int4' is not among the checkpoints \\(bf16, qat\\)"):
        compare_checkpoints({"bf16": {"mc/acc": 1.0}, "qat": {"mc/acc": 1.0}}, ptq="int4")
    only_two = compare_checkpoints({"bf16": {"mc/acc": 1.0}, "qat": {"mc/acc": 0.9}})
    assert only_two.ptq is None and only_two.recovered == {} and "recovered" not in only_two.table()
    named = compare_checkpoints({"fp": {"mc/acc": 0.6}, "rtn": {"mc/acc": 0.4}, "qat": {"mc/acc": 0.5}},
                                baseline="fp", ptq="rtn")
    assert named.recovered == {"qat": {"mc/acc": pytest.approx(0.5)}}


def test_results_are_written_whole_with_the_checkpoints_still_pending(tmp_path, monkeypatch):
    comparison = compare_checkpoints({"bf16": {"perplexity": 10.0}})
    target = tmp_path / "eval_results.json"
    target.write_text("an earlier run's results")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, dest: (renamed.append(os.path.basename(source)),
                                                             real_replace(source, dest)))
    assert json.loads(comparison.write_json(target, pending=["ptq", "qat"]).read_text())["pending"] == ["ptq", "qat"]
    assert renamed[0].startswith(".eval_results.json.tmp-")  # written aside, then renamed over the old file
    assert json.loads(comparison.write_json(target).read_text())["pending"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["eval_results.json"]
