"""A PNG bar chart of a `Comparison`: one panel per metric, one bar per checkpoint (matplotlib, lazy).

Each panel's y-axis fits its values (and their standard errors, drawn as error bars): a margin of
Y_MARGIN of their range around min..max, so that 22.89 / 22.92 / 23.06 look different. The axis then
does not start at zero, and its label says where it starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from qattune.errors import QattuneError
from qattune.eval.compare import Comparison, format_share, format_values

PANELS_PER_ROW = 3
PANEL_SIZE_INCHES = (4.0, 3.2)
DPI = 100
Y_MARGIN = 0.25  # of the values' range, below and above it
FLAT_MARGIN = 0.01  # of the value's size, when every value is the same


def y_limits(values: Sequence[Optional[float]], errors: Sequence[Optional[float]]) -> Optional[tuple[float, float]]:
    """The y-axis range of a panel: min..max of `values` +- `errors`, widened by Y_MARGIN of that span;
    from zero when the values are not negative and the margin would reach below it. None: no values."""
    spans = [(v - (e or 0.0), v + (e or 0.0)) for v, e in zip(values, errors) if v is not None]
    if not spans:
        return None
    low, high = min(s[0] for s in spans), max(s[1] for s in spans)
    margin = Y_MARGIN * (high - low) or FLAT_MARGIN * abs(high) or 1.0
    bottom = low - margin
    return (0.0 if low >= 0 > bottom else bottom), high + margin


def panel_title(comparison: Comparison, metric: str) -> str:
    """The metric, its direction and each other checkpoint's recovered share (as the table shows it)."""
    direction = "higher is better" if comparison.higher_is_better[metric] else "lower is better"
    shares = [f"{name}: {format_share(s[metric])}" for name, s in comparison.recovered.items()]
    return f"{metric}\n({direction})" + (f"\nrecovered {', '.join(shares)}" if shares else "")


def _draw_panel(ax, comparison: Comparison, metric: str, colors) -> None:
    names = list(comparison.checkpoints)
    values = [comparison.checkpoints[n][metric] for n in names]
    errors = [comparison.stderr.get(n, {}).get(metric) for n in names]
    limits = y_limits(values, errors)
    bars = ax.bar(names, [0.0 if v is None else v for v in values],
                  yerr=[e or 0.0 for e in errors] if any(errors) else None, capsize=3,
                  color=[colors[i % len(colors)] for i in range(len(names))])
    if limits is not None:
        ax.set_ylim(*limits)
        if limits[0] > 0:
            ax.set_ylabel(f"axis starts at {limits[0]:.4g}, not 0", fontsize=7)
    bottom = ax.get_ylim()[0]
    for bar, value, error, label in zip(bars, values, errors, format_values(values)):
        top = bottom if value is None else value + (error or 0.0)
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom", fontsize=8)
    ax.set_title(panel_title(comparison, metric), fontsize=9)
    ax.tick_params(axis="x", labelsize=8)


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
    metrics = comparison.metrics
    columns = min(PANELS_PER_ROW, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, squeeze=False,
                                figsize=(PANEL_SIZE_INCHES[0] * columns, PANEL_SIZE_INCHES[1] * rows))
    colors = plt.get_cmap("tab10").colors
    for index, metric in enumerate(metrics):
        _draw_panel(axes[index // columns][index % columns], comparison, metric, colors)
    for index in range(len(metrics), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    plt.close(figure)
    return path
