"""A PNG bar chart of a `Comparison`: one panel per metric, one bar per checkpoint (matplotlib, lazy)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Union

from qattune.errors import QattuneError
from qattune.eval.compare import Comparison

PANELS_PER_ROW = 3
PANEL_SIZE_INCHES = (4.0, 3.2)
DPI = 100


def plot_comparison(comparison: Comparison, path: Union[str, os.PathLike]) -> Path:
    """Save the chart to `path` (PNG). Each panel title names the metric, its direction, and the share of
    the PTQ degradation each other checkpoint recovered."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QattuneError("saving a comparison plot needs matplotlib, which is not installed; "
                           "pip install 'qattune[eval]' (or: pip install matplotlib), or turn the plot off") from None
    metrics, names = comparison.metrics, list(comparison.checkpoints)
    columns = min(PANELS_PER_ROW, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, squeeze=False,
                                figsize=(PANEL_SIZE_INCHES[0] * columns, PANEL_SIZE_INCHES[1] * rows))
    colors = plt.get_cmap("tab10").colors
    for index, metric in enumerate(metrics):
        ax = axes[index // columns][index % columns]
        values = [comparison.checkpoints[n][metric] for n in names]
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(names, heights, color=[colors[i % len(colors)] for i in range(len(names))])
        for bar, value in zip(bars, values):
            ax.annotate("-" if value is None else f"{value:.4g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        arrow = "higher is better" if comparison.higher_is_better[metric] else "lower is better"
        shares = [f"{n}: {100 * s:.0f}%" for n, r in comparison.recovered.items() if (s := r[metric]) is not None]
        title = f"{metric}\n({arrow})" + (f"\nrecovered {', '.join(shares)}" if shares else "")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    for index in range(len(metrics), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    plt.close(figure)
    return path
