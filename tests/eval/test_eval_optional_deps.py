"""qattune.eval works without lm-eval and matplotlib until they are needed, then says how to install them."""

import subprocess
import sys

import pytest

from gen_tiny import ByteChatTokenizer, tiny_model
from qattune.errors import QattuneError
from qattune.eval import compare_checkpoints, lm_eval_model, plot_comparison, run_lm_eval


def test_importing_eval_and_generation_loads_neither_lm_eval_nor_matplotlib():
    code = ("import sys, qattune.eval, qattune.generation; "
            "print('lm_eval' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_missing_packages_are_one_line_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(QattuneError, match=r"lm-eval tasks need the lm-eval package, which is not installed; "
                                           r"pip install 'qattune\[eval\]'"):
        lm_eval_model(tiny_model(), ByteChatTokenizer())
    with pytest.raises(QattuneError, match="not installed"):
        run_lm_eval(object(), ["any"])
    comparison = compare_checkpoints({"bf16": {"perplexity": 1.0}})
    with pytest.raises(QattuneError, match=r"saving a comparison plot needs matplotlib"):
        plot_comparison(comparison, tmp_path / "x.png")
