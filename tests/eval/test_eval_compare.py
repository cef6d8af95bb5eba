"""Side-by-side comparison: recovered share, table, JSON and PNG."""

import json
import struct

import pytest

from qattune.errors import QattuneError
from qattune.eval import compare_checkpoints, infer_higher_is_better, plot_comparison, recovered_share

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
])
def test_recovered_share(b, p, q, higher, expected):
    share = recovered_share(b, p, q, higher)
    assert share == (None if expected is None else pytest.approx(expected))


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


def test_directions_and_errors():
    assert infer_higher_is_better("wikitext/word_perplexity") is False
    assert infer_higher_is_better("gsm8k/exact_match,strict-match") is True
    with pytest.raises(QattuneError, match="cannot tell whether higher or lower is better for metric 'x/score'"):
        compare_checkpoints({"bf16": {"x/score": 1.0}})
    explicit = compare_checkpoints({"bf16": {"x/score": 1.0}, "ptq": {"x/score": 3.0}, "qat": {"x/score": 2.0}},
                                   higher_is_better={"x/score": False})
    assert explicit.recovered["qat"]["x/score"] == pytest.approx(0.5)
    with pytest.raises(QattuneError, match="ptq checkpoint 'int4' is not among the results \\(bf16, qat\\)"):
        compare_checkpoints({"bf16": {"mc/acc": 1.0}, "qat": {"mc/acc": 1.0}}, ptq="int4")
    only_two = compare_checkpoints({"bf16": {"mc/acc": 1.0}, "qat": {"mc/acc": 0.9}})
    assert only_two.ptq is None and only_two.recovered == {} and "recovered" not in only_two.table()
    named = compare_checkpoints({"fp": {"mc/acc": 0.6}, "rtn": {"mc/acc": 0.4}, "qat": {"mc/acc": 0.5}},
                                baseline="fp", ptq="rtn")
    assert named.recovered == {"qat": {"mc/acc": pytest.approx(0.5)}}
