"""The comparison's report: WORKDIR/report.md with the table, per-category NLL, run details and plots.

It reads only `results.json`'s content (`compare.run_comparison`), so a finished comparison can be
reported again without training or evaluating anything.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from nuggets_jax import plots as plots_lib
from nuggets_jax import store as store_lib

_KIND_COLORS = {"golden": "tab:orange", "random": "tab:gray", "full": "tab:blue"}


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, spec) if isinstance(value, float) else str(value)


def _table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table as one item of the report's lines (no trailing newline)."""
    return plots_lib.markdown_table(header, rows).rstrip("\n")


def _plot_eval(results: dict, path: pathlib.Path) -> str:
    rows = results["variants"]
    figure, axes = plots_lib.new_axes(1.1 * len(rows) + 3.0, 4.0)
    names = [r["variant"] for r in rows]
    axes.bar(range(len(rows)), [r["nll_per_token"] for r in rows], color=[_KIND_COLORS[r["kind"]] for r in rows])
    axes.axhline(results["base"]["nll_per_token"], color="black", linestyle="--", label="base model")
    axes.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    low = min(results["base"]["nll_per_token"], *(r["nll_per_token"] for r in rows))
    high = max(results["base"]["nll_per_token"], *(r["nll_per_token"] for r in rows))
    axes.set_ylim(max(0.0, low - 0.15 * (high - low + 1e-9)), high + 0.1 * (high - low + 1e-9))
    axes.set(title=f"Held-out response NLL per token ({results['eval']['examples']} examples)", ylabel="NLL / token")
    axes.legend()
    return plots_lib.save_png(figure, path)


def _plot_loss(results: dict, path: pathlib.Path) -> str:
    figure, axes = plots_lib.new_axes(6.4, 4.0)
    styles = iter(["-", "--", ":", "-."] * 8)
    for r in results["variants"]:
        curve = np.asarray(r["loss_curve"])
        style = next(styles) if r["kind"] == "random" else "-"
        color = _KIND_COLORS[r["kind"]]
        axes.plot(np.arange(1, curve.size + 1), curve, style, color=color, label=r["variant"], alpha=0.85)
    axes.set(title="Training loss (response tokens)", xlabel="step", ylabel="loss / token")
    axes.legend()
    return plots_lib.save_png(figure, path)


def write_report(workdir: str | pathlib.Path, results: dict) -> pathlib.Path:
    """WORKDIR/report.md: the comparison table, per-category NLL, run details and two plots."""
    workdir = pathlib.Path(workdir)
    plots = workdir / "plots"
    plots.mkdir(exist_ok=True)
    train = results["train"]
    base = results["base"]
    header = [
        "variant",
        "records",
        "clean",
        "epochs",
        "train tokens",
        "train loss (last 5 steps)",
        "eval NLL/token",
        "eval PPL",
        "Δ NLL vs base",
        "win rate vs base",
    ]
    rows = [
        [
            "base (not fine-tuned)",
            "–",
            "–",
            "–",
            "–",
            "–",
            _fmt(base["nll_per_token"]),
            _fmt(base["perplexity"], ".3f"),
            "–",
            "–",
        ]
    ]
    for r in results["variants"]:
        rows.append(
            [
                r["variant"],
                str(r["records"]),
                _fmt(r["clean_fraction"], ".0%"),
                _fmt(r["epochs"], ".1f"),
                str(r["train_tokens"]),
                _fmt(r["final_train_loss"]),
                _fmt(r["nll_per_token"]),
                _fmt(r["perplexity"], ".3f"),
                _fmt(r["delta_nll_per_token"], "+.4f"),
                _fmt(r["win_rate_vs_base"], ".3f"),
            ]
        )
    summary = results["random_summary"]
    if summary and summary["seeds"] > 1:
        rows.append(
            [f"random (mean ± std, {summary['seeds']} seeds)", "", "", "", "", ""]
            + [
                f"{summary['nll_per_token']:.4f} ± {summary['nll_per_token_std']:.4f}",
                f"{summary['perplexity']:.3f} ± {summary['perplexity_std']:.3f}",
                f"{summary['delta_nll_per_token']:+.4f}",
                f"{summary['win_rate_vs_base']:.3f} ± {summary['win_rate_vs_base_std']:.3f}",
            ]
        )
    step_tokens = train["micro_batches"] * train["batch_rows"]
    parts = [
        "# Fine-tuning comparison: golden vs random vs full pool",
        "",
        f"- Pool: {results['pool']} ({results['pool_size']} records); golden = top {results['top_k']} by "
        f"`{results['metric']}` from `{results['scoring_workdir']}`; random = {results['top_k']} records per seed.",
        f"- Model: `{results['model']}`, compute dtype {train['dtype']}.",
        f"- Training, equal for every variant: {train['steps']} steps of {step_tokens} packed rows "
        f"({train['micro_batches']} micro-batch(es) x {train['batch_rows']} rows), AdamW lr {train['learning_rate']:g} "
        f"(warmup {train['warmup_steps']}, cosine to {train['end_learning_rate']:g}x), weight decay "
        f"{train['weight_decay']:g}, clip {train['clip_norm']:g}; loss on response (+eos) tokens only.",
        f"- Evaluation: {results['eval']['source']}: {results['eval']['examples']} examples, "
        f"{results['eval']['response_tokens']} response tokens, {results['eval']['pool_overlap']} repeating a pool "
        "example. Win rate = share of examples whose response NLL is lower than the base model's (ties count 1/2).",
        "",
        _table_lines(header, rows),
        "",
        f"![eval NLL]({_plot_eval(results, plots / 'eval_nll.png')})",
        "",
        f"![loss curves]({_plot_loss(results, plots / 'loss_curves.png')})",
    ]
    if base.get("by_category"):
        cats = list(base["by_category"])
        cat_rows = [["base", *(_fmt(base["by_category"][c]) for c in cats)]]
        cat_rows += [[r["variant"], *(_fmt(r["by_category"][c]) for c in cats)] for r in results["variants"]]
        parts += ["", "## Eval NLL per token by category", "", _table_lines(["variant", *cats], cat_rows)]
    detail = [
        [
            r["variant"],
            _fmt(r["train_wall_s"], ".0f"),
            _fmt(r["tokens_per_s"], ".0f"),
            _fmt(r["eval_s"], ".1f"),
            str(r["programs_compiled"]),
            f"`{r['checkpoint']}`",
        ]
        for r in results["variants"]
    ]
    parts += [
        "",
        "## Run details",
        "",
        _table_lines(
            ["variant", "train s", "train tokens/s", "eval s", "programs compiled", "final checkpoint"], detail
        ),
        "",
        f"Base model evaluation {results['base_eval_s']:.1f}s; this invocation {results['wall_s']:.0f}s (a resumed "
        "comparison skips finished training and evaluations; the table shows the times of the runs that did them).",
        "",
    ]
    path = workdir / "report.md"
    store_lib.atomic_write_bytes(path, "\n".join(parts).encode())
    return path
