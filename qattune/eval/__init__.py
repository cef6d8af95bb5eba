"""qattune.eval: built-in perplexity, lm-eval tasks through an adapter, side-by-side checkpoint comparison.

lm-eval and matplotlib are imported only when used (`run_lm_eval`, `lm_eval_model`, `plot_comparison`).
"""

from .compare import Comparison
from .compare import compare_checkpoints
from .compare import infer_higher_is_better
from .compare import recovered_share
from .lm_eval_tasks import LmEvalResults
from .lm_eval_tasks import check_tasks
from .lm_eval_tasks import lm_eval_model
from .lm_eval_tasks import run_lm_eval
from .perplexity import DocumentScore
from .perplexity import PerplexityResult
from .perplexity import load_texts
from .perplexity import perplexity
from .perplexity import perplexity_windows
from .plot import plot_comparison
from .scoring import WindowScore
from .scoring import score_windows

__all__ = [
    "Comparison",
    "DocumentScore",
    "LmEvalResults",
    "PerplexityResult",
    "WindowScore",
    "check_tasks",
    "compare_checkpoints",
    "infer_higher_is_better",
    "lm_eval_model",
    "load_texts",
    "perplexity",
    "perplexity_windows",
    "plot_comparison",
    "recovered_share",
    "run_lm_eval",
    "score_windows",
]
