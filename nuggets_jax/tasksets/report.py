"""The report of a task-set sweep: `report.md` and PNG plots under `plots/`, from stability.json's content.

Plots are drawn on matplotlib `Figure` objects with the Agg canvas (`plots`, no pyplot global state):
rank correlation with the reference vs task-set size per construction (error bars: standard
deviation over seeds), top-fraction overlap vs size, and the Spearman correlation between
metrics on the whole union of tasks.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from nuggets_jax import plots as plots_lib
from nuggets_jax.tasksets import stability as stability

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    return format(value, spec)


def _mean_std(entry: Mapping[str, Any], key: str) -> str:
    mean, std = entry.get(f"{key}_mean"), entry.get(f"{key}_std")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None and math.isfinite(std) else f"{mean:.3f}"


def _line_label(entry: Mapping[str, Any], multi_m: bool, multi_init: bool) -> str:
    label = entry["construction"]
    if multi_m:
        label += f", m={entry['m']}"
    if multi_init and entry["construction"] == "kmeans":
        label += f", n_init={entry['n_init']}"
    return label


def _lines(summary: Sequence[Mapping[str, Any]], metric: str) -> dict[str, list[Mapping[str, Any]]]:
    """The summary entries of one metric grouped into plot lines, each sorted by k."""
    multi_m = len({e["m"] for e in summary}) > 1
    multi_init = len({e["n_init"] for e in summary if e["construction"] == "kmeans"}) > 1
    lines: dict[str, list[Mapping[str, Any]]] = {}
    for entry in summary:
        if entry["metric"] == metric:
            lines.setdefault(_line_label(entry, multi_m, multi_init), []).append(entry)
    return {label: sorted(points, key=lambda e: e["k"]) for label, points in lines.items()}


def _plot_vs_size(
    summary: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    keys: Sequence[tuple[str, str, str, str]],
    title: str,
    path,
) -> str:
    """One panel per metric; a line per construction and key (key, legend suffix, line style, marker)."""
    figure = Figure(figsize=(4.6 * len(metrics), 4.0))
    for column, metric in enumerate(metrics, start=1):
        axes = figure.add_subplot(1, len(metrics), column)
        sizes: set[int] = set()
        for color, (label, points) in zip(_COLORS * 4, _lines(summary, metric).items(), strict=False):
            k = np.asarray([p["k"] for p in points])
            sizes.update(int(x) for x in k)
            for key, suffix, style, marker in keys:
                mean = np.asarray([p[f"{key}_mean"] for p in points], np.float64)
                std = np.nan_to_num(np.asarray([p[f"{key}_std"] for p in points], np.float64))
                axes.errorbar(
                    k, mean, yerr=std, color=color, linestyle=style, marker=marker, capsize=3, label=label + suffix
                )
        if sizes:
            axes.set_xscale("log")
            axes.set_xticks(sorted(sizes), [str(s) for s in sorted(sizes)])
            axes.minorticks_off()
        axes.set(title=f"{title}: {metric}", xlabel="task-set size K", ylim=(min(0.0, axes.get_ylim()[0]), 1.02))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return plots_lib.save_png(figure, path)


def summary_table(result: Mapping[str, Any]) -> str:
    """Markdown table of the mean ± std over seeds of every (construction, K, M, metric)."""
    tops = [stability.fraction_label(f) for f in result["fractions"]]
    header = ["construction", "K", "M", "metric", "seeds", "Spearman", "Kendall", *[t.replace("_", " ") for t in tops]]
    header.append("cost (Mtok)")
    rows = []
    for e in sorted(result["summary"], key=lambda e: (e["metric"], e["construction"], e["m"], e["k"])):
        cost = e["cost_tokens_mean"] / 1e6
        rows.append(
            [e["construction"], str(e["k"]), str(e["m"]), e["metric"], str(e["rows"])]
            + [_mean_std(e, key) for key in ("spearman", "kendall", *tops)]
            + [f"{cost:.3f}"]
        )
    return plots_lib.markdown_table(header, rows)


def variants_table(result: Mapping[str, Any]) -> str:
    """Markdown table with one row per variant."""
    tops = [stability.fraction_label(f) for f in result["fractions"]]
    header = ["task set", "metric", "tasks", "shared w/ ref", "task tokens", "cost (tokens)", "cost vs ref"]
    header += ["Spearman", "Kendall"]
    header += [t.replace("_", " ") for t in tops] + ["reference"]
    rows = []
    for r in result["variants"]:
        rows.append(
            [r["taskset"], r["metric"], _fmt(r["tasks"]), _fmt(r["shared_with_reference"])]
            + [_fmt(r["task_tokens"]), _fmt(r["cost_tokens"])]
            + [_fmt(r["cost_vs_reference"], ".2f"), _fmt(r["spearman"]), _fmt(r["kendall"])]
            + [_fmt(r[t]) for t in tops]
            + ["yes" if r["is_reference"] else ""]
        )
    return plots_lib.markdown_table(header, rows)


def write_sweep_report(workdir: str | pathlib.Path, result: Mapping[str, Any]) -> pathlib.Path:
    """Writes workdir/report.md and workdir/plots/*.png from a sweep result (stability.json's content).

    Returns:
      The path of report.md.
    """
    workdir = pathlib.Path(workdir)
    plots = workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    counts, timings = result["counts"], result["timings"]
    metrics = list(dict.fromkeys(r["metric"] for r in result["variants"]))
    tops = [stability.fraction_label(f) for f in result["fractions"]]
    widest = stability.fraction_label(max(result["fractions"])) if tops else None

    reused = result.get("scoring_reused_candidates") or 0
    reused = f" ({reused} of {counts['candidates']} candidates scored by an earlier run)" if reused else ""
    refs = ", ".join(f"{m}: `{r['taskset']}`" for m, r in result["reference"].items())
    parts = [
        "# Task-set sweep report\n",
        f"- candidates: {counts['candidates']:,}; task source: `{result['source']['path']}` "
        f"({result['source']['eligible']:,} eligible examples)",
        f"- {counts['variants']} variants over {counts['tasksets']} task sets; scored once: the union of "
        f"{counts['union_columns']} task columns ({counts['scored_task_tokens']:,} task tokens); summed over "
        f"variants: {counts['columns_summed_over_variants']} columns "
        f"({counts['columns_summed_over_tasksets']} over distinct task sets)",
        f"- reference ranking per metric: {refs}",
        f"- wall time {timings['wall_s']:.0f}s: task sets {timings['tasksets_s']:.0f}s (embedding "
        f"{timings['embed_s']:.0f}s), scoring {timings['scoring_s']:.0f}s{reused}, evaluation "
        f"{timings['evaluate_s']:.1f}s",
        "",
        "Stability is measured against the reference ranking over all candidates: Spearman and Kendall "
        "(tau-b) rank correlation, and the Jaccard overlap of the top 1/5/10% (ties broken by position, as "
        "in the golden-set selection). Cost = task tokens a separate scoring run of that task set would "
        "process (sum of its task lengths x candidates). A variant that shares tasks with the reference "
        '(column "shared w/ ref") agrees with it partly by construction.\n',
        "## Stability by task-set size (mean ± std over seeds; reference excluded)\n",
        summary_table(result),
        "## Plots\n",
    ]
    correlation = _plot_vs_size(
        result["summary"],
        metrics,
        [("spearman", " Spearman", "-", "o"), ("kendall", " Kendall", "--", "s")],
        "rank correlation with reference",
        plots / "correlation_vs_size.png",
    )
    parts.append(f"![correlation vs size]({correlation})\n")
    if widest:
        overlap = _plot_vs_size(
            result["summary"],
            metrics,
            [(widest, "", "-", "o")],
            f"{widest.replace('_', ' ')} overlap (Jaccard)",
            plots / "top_overlap_vs_size.png",
        )
        parts.append(f"![top overlap vs size]({overlap})\n")
    names = result["metric_correlation"]["names"]
    matrix = np.asarray(result["metric_correlation"]["matrix"], np.float64)
    title = "Spearman between metrics (all union tasks)"
    heatmap = plots_lib.correlation_heatmap(names, matrix, title, plots / "metric_correlation.png")
    parts += [
        "## Metric agreement on the union of tasks\n",
        f"![metric correlation]({heatmap})\n",
        plots_lib.markdown_table(
            ["", *names], [[n, *[_fmt(float(x)) for x in row]] for n, row in zip(names, matrix, strict=True)]
        ),
        "## Every variant\n",
        variants_table(result),
        f"Task sets: `tasksets/<name>.json` (+ `.provenance.json`); union: `tasks_union.json`; scores: "
        f"`{result['scoring_workdir']}`.\n",
    ]
    path = workdir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
