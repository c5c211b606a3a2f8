"""report.md and the recall-against-compute plot of the adaptive evaluation (`replay`)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from matplotlib.figure import Figure

from nuggets_jax import plots as plots_lib


def plot_frontier(rows: list[dict], config, labels: Sequence[str], path: pathlib.Path) -> str:
    """Recall against compute: one panel per (metric, golden fraction), one line per setting over confidences."""
    metrics, fractions = list(config.metrics), list(config.fractions)
    figure = Figure(figsize=(4.2 * len(fractions), 3.6 * len(metrics)))
    for i, metric in enumerate(metrics):
        for j, fraction in enumerate(fractions):
            axes = figure.add_subplot(len(metrics), len(fractions), i * len(fractions) + j + 1)
            for k, label in enumerate(labels):
                pts = [r for r in rows if (r["metric"], r["top_fraction"], r["setting"]) == (metric, fraction, label)]
                pts.sort(key=lambda r: r["confidence"])
                x, y = [p["compute_fraction"] for p in pts], [p["recall"] for p in pts]
                axes.plot(x, y, marker="o^sDv"[k % 5], color=f"C{k}", label=label)
                for p in pts:
                    axes.annotate(f"{p['confidence']:g}", (p["compute_fraction"], p["recall"]), fontsize=6)
            if fraction == 0.1:
                axes.axvline(config.target_fraction, color="grey", linestyle=":")
                axes.axhline(config.target_recall, color="grey", linestyle=":")
            axes.set_xlim(0, 1.02)
            axes.set_xlabel("pairs scored / exact pairs")
            axes.set_ylabel("recall of the exact golden set")
            axes.set_title(f"{metric}, top {fraction:.0%}", fontsize=9)
            axes.legend(fontsize=6, loc="lower right")
    return plots_lib.save_png(figure, path)


def write_report(workdir: pathlib.Path, rows: list[dict], real: dict | None, info: dict, config) -> pathlib.Path:
    """Writes workdir/report.md: the replay table, whether the target is met, the real run."""
    lines = [
        "# Adaptive scoring vs exact scoring\n",
        f"Pool: {info['pool']} ({info['candidates']} candidates), tasks: {info['tasks_source']} "
        f"({info['tasks']} tasks), model: {info['model']}. Each adaptive setting is replayed on the exact "
        f"run's per-(candidate, task) values for {config.repeats} task permutation(s); numbers are means "
        "over permutations (recall min = worst permutation). Rounds: "
        f"{config.adaptive.initial_tasks} tasks for everyone, then {config.adaptive.tasks_per_round} per round.\n",
        "Settings: the interval (`betting`: exact confidence sequence; `normal`: Student-t with the "
        "finite-population correction), the guarantee (`joint`: the confidence holds for every decision of the run "
        "together, a union bound over candidates; `candidate`: each candidate's interval on its own), and any other "
        "adaptive.* field (`panel=P`: P reference candidates scored in every round, intervals relative to them). "
        "Compute fraction = pairs scored / exact pairs (the panel's included).\n",
        "| metric | golden set | setting | confidence | recall | recall min | compute fraction | "
        "Spearman on the selected set |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = "n/a" if r["spearman_selected"] is None else f"{r['spearman_selected']:.3f}"
        lines.append(
            f"| {r['metric']} | top {r['top_fraction']:.0%} ({r['golden_size']}) | {r['setting']} | "
            f"{r['confidence']:g} | {r['recall']:.3f} | {r['recall_min']:.3f} | {r['compute_fraction']:.1%} | {sp} |"
        )
    goal = [
        r
        for r in rows
        if r["top_fraction"] == 0.1
        and r["recall"] >= config.target_recall
        and r["compute_fraction"] <= config.target_fraction
    ]
    lines.append(
        f"\nTarget (exact top-10% recall >= {config.target_recall} at <= {config.target_fraction:.0%} of the pairs): "
        + (
            "met by " + ", ".join(f"{r['metric']} {r['setting']} at confidence {r['confidence']:g}" for r in goal)
            if goal
            else "not met by any setting here."
        )
        + "\n"
    )
    lines.append("![recall against compute](plots/adaptive_frontier.png)\n")
    if real:
        lines += [
            "## A real adaptive run through the engine\n",
            f"Setting {real['setting']}: recall of the exact golden set {real['recall']:.3f}, "
            f"{real['pairs_scored']} of {real['pairs_exact']} pairs ({real['compute_fraction']:.1%}), "
            f"{real['flops_fraction'] or float('nan'):.1%} of the exact run's model FLOPs; one-shot "
            f"time {real['one_shot_s']:.0f} s against {real['exact_one_shot_s'] or float('nan'):.0f} s exact "
            f"({real['time_fraction'] or float('nan'):.1%}); {real['tokens_per_s']:.0f} task tokens/s "
            f"(exact {real['exact_tokens_per_s'] or float('nan'):.0f}). The two runs may have shared the "
            "machine with other work; compare time fractions with care.\n",
        ]
    path = workdir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
