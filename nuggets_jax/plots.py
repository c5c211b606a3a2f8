"""The figures and tables of the reports: matplotlib `Figure`s drawn with the Agg canvas and saved
as PNG, and markdown tables.

Never through pyplot, so no display or global backend state is involved, and saved without the
"Software" metadata entry, so a figure's bytes depend on its data and the drawing code only.
Shared by `scoring.report` (a scoring run: the figures below), `tasksets.report`,
`finetune.report` and `scoring.adaptive.replay_report`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
CLEAN = "clean"  # the corruption kind (and legend label) of records whose "corruption" is null


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of already formatted cells, ending with a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def new_axes(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure of `width` x `height` inches holding one axes."""
    figure = Figure(figsize=(width, height))
    return figure, figure.add_subplot()


def save_png(figure: Figure, path: pathlib.Path) -> str:
    """Lays out and writes `figure` to `path`; returns its link from report.md, `plots/<name>`."""
    FigureCanvasAgg(figure)
    figure.tight_layout()
    # No "Software" entry, so the bytes do not change with the matplotlib version.
    figure.savefig(path, dpi=DPI, metadata={"Software": None})
    return f"plots/{path.name}"


def correlation_heatmap(
    names: Sequence[str],
    matrix: np.ndarray,
    title: str,
    path: pathlib.Path,
    row_names: Sequence[str] | None = None,
    label: str = "Spearman rho",
) -> str:
    """Correlations [R, M] in [-1, 1] (rows `row_names`, default `names`: Spearman rho between metrics),
    each cell labelled with its value (NaN as n/a)."""
    row_names = names if row_names is None else row_names
    figure, axes = new_axes(1.4 * len(names) + 2.5, 1.1 * len(row_names) + 1.8)
    image = axes.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    for i, j in np.ndindex(matrix.shape):
        text = "n/a" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}"
        axes.text(j, i, text, ha="center", va="center", color="white" if abs(matrix[i, j]) > 0.6 else "black")
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_yticks(range(len(row_names)), row_names)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=label)
    return save_png(figure, path)


def metric_histogram(
    values: np.ndarray, kinds: np.ndarray | None, name: str, cut: float | None, path: pathlib.Path
) -> str:
    """Histogram of one metric over candidates [C], stacked clean/corrupted when `kinds` [C] is known."""
    figure, axes = new_axes(6.4, 4.0)
    finite = np.isfinite(values)
    edges = np.histogram_bin_edges(values[finite], bins=int(np.clip(np.sqrt(finite.sum()), 10, 50)))
    if kinds is None:
        axes.hist(values[finite], bins=edges, color="tab:blue", label="candidates")
    else:
        clean = kinds == CLEAN
        groups = [values[finite & clean], values[finite & ~clean]]
        axes.hist(groups, bins=edges, stacked=True, color=["tab:blue", "tab:red"], label=[CLEAN, "corrupted"])
    if cut is not None:
        axes.axvline(cut, color="black", linestyle="--", label=f"golden-set cut ({cut:.4g})")
    axes.set(title=f"Distribution of {name} over candidates", xlabel=name, ylabel="candidates")
    axes.legend()
    return save_png(figure, path)


def metric_scatter(values: dict[str, np.ndarray], metric: str, kinds: np.ndarray | None, path: pathlib.Path) -> str:
    """One panel per other metric against `metric` (name -> [C]), clean and corrupted in two colours."""
    others = [name for name in values if name != metric] or [metric]
    figure = Figure(figsize=(4.2 * len(others), 4.0))
    groups = [("candidates", np.ones(values[metric].size, bool), "tab:blue")]
    if kinds is not None:
        groups = [(CLEAN, kinds == CLEAN, "tab:blue"), ("corrupted", kinds != CLEAN, "tab:red")]
    for column, other in enumerate(others, start=1):
        axes = figure.add_subplot(1, len(others), column)
        for label, mask, color in groups:
            axes.scatter(values[metric][mask], values[other][mask], s=10, alpha=0.6, color=color, label=label)
        axes.set(title=f"{other} vs {metric}", xlabel=metric, ylabel=other)
    axes.legend()
    return save_png(figure, path)


def corruption_boxplot(
    values: np.ndarray, kinds: np.ndarray, labels: Sequence[str], metric: str, path: pathlib.Path
) -> str:
    """A box per corruption kind in `labels` of `metric` [C], with every record as a jittered point."""
    figure, axes = new_axes(max(5.0, 1.3 * len(labels) + 2.0), 4.2)
    data = [points[np.isfinite(points)] for points in (values[kinds == label] for label in labels)]
    axes.boxplot(data, tick_labels=list(labels), showfliers=False)
    jitter = np.random.default_rng(0)  # fixed seed: the same workdir gives the same picture
    for position, points in enumerate(data, start=1):
        offsets = jitter.uniform(-0.15, 0.15, points.size)
        color = "tab:blue" if labels[position - 1] == CLEAN else "tab:red"
        axes.scatter(position + offsets, points, s=9, alpha=0.5, color=color)
    axes.set(title=f"{metric} by corruption kind", xlabel="corruption kind", ylabel=metric)
    return save_png(figure, path)


def task_win_fractions(labels: Sequence[str], fractions: np.ndarray, path: pathlib.Path) -> str:
    """Bars of the fraction of candidates that beat zero-shot [T], in the given (sorted) task order."""
    figure, axes = new_axes(min(16.0, max(6.0, 0.28 * len(labels) + 2.0)), 4.2)
    axes.bar(range(len(labels)), fractions, color="tab:green")
    axes.axhline(0.5, color="black", linestyle="--", linewidth=1, label="half of the candidates")
    if len(labels) <= 40:
        axes.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    axes.set(title="Fraction of candidates that beat zero-shot, per task (sorted)", ylim=(0, 1))
    axes.set(xlabel="task" if len(labels) <= 40 else f"{len(labels)} tasks, sorted", ylabel="fraction")
    axes.legend()
    return save_png(figure, path)
