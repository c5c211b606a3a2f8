"""Human-readable report of a scoring run: `report.md` plus PNG plots under `plots/`.

Reads only the workdir (docs/ARCHITECTURE.md, "The workdir of a scoring run"): ranking.jsonl for the metrics,
scores.npz for the per-task view, golden.json, config.json and run.json. Every file but
ranking.jsonl, and every key, is optional: what is missing prints as "n/a". Pure NumPy +
matplotlib: the figures (`plots`) are drawn on `Figure` objects with the Agg canvas, never through
pyplot, so no display or global backend state is involved. Output is deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import plots as plots_lib
from nuggets_jax.errors import UserError
from nuggets_jax.metrics import BASELINE_FORMULAS, BASELINES, METRIC_FORMULAS, METRICS, auroc, spearman
from nuggets_jax.plots import CLEAN
from nuggets_jax.select import (
    Diversity,
    SelectionError,
    SelectionRule,
    golden_path,
    rank_order,
    read_golden,
    read_ranking,
)

FORMULAS = {**METRIC_FORMULAS, **BASELINE_FORMULAS}

NA = "n/a"
_TEXT_CHARS = 120
_CUT_KEYS = ("candidates_cut", "tasks_cut", "max_prefix_tokens", "max_task_tokens")
_BUCKET_KEYS = ("row_length", "rows_per_group", "groups", "fill")
_RUN_KEYS = ("devices.count", "devices.kind", "devices.platform", "devices.processes", "counts.pairs")
_RUN_KEYS += ("programs_compiled", "compiles_after_warmup", "resumed_candidates")
# Markdown specials; "_" only where it could start or end emphasis, so snake_case stays readable.
_MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]<>|]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


class ReportError(UserError):
    """A workdir that cannot be reported on."""


def _get(tree: Any, dotted: str) -> Any:
    """Looks up "a.b.c" in nested dicts (or a flat "a.b.c" key); None when absent."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return tree.get(dotted) if isinstance(tree, Mapping) else None
        node = node[part]
    return node


def _number(value: Any) -> float | None:
    """The value as a finite float, or None for anything else (missing, text, NaN, infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _float(value: Any) -> float:
    number = _number(value)
    return float("nan") if number is None else number


def _fmt(value: Any, spec: str = ".4g") -> str:
    """Formats a number for the report; counts print whole, anything missing or non-finite as n/a."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(int(value))
    number = _number(value)
    if number is not None:
        return format(number, spec)
    return NA if value is None or isinstance(value, float | np.floating) else _cell(value)


def _cell(text: Any, limit: int | None = None) -> str:
    """Makes text safe for one markdown table cell: one line, truncated, special characters escaped."""
    text = " ⏎ ".join(line.strip() for line in str(text).strip().splitlines())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    # Escaping after truncation so an escape is never cut in half.
    return _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(), text)


def _code(text: Any) -> str:
    """An inline code span (backslash escapes do not work inside one, so backticks become quotes)."""
    return NA if text is None else "`" + " ".join(str(text).split()).replace("`", "'") + "`"


def _read_json(path: pathlib.Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix or delete it") from error


def _golden_rule(run: Any, config: Any) -> str:
    """The rule that picked the golden set, e.g. "top_fraction = 0.1": run.json's "selection" (what
    the run used, the default included), else config.json's select section, else "rule n/a"."""
    selection, select = _get(run, "selection"), _get(config, "select")
    try:
        if isinstance(selection, Mapping):
            rule = SelectionRule(**selection)
        elif isinstance(select, Mapping):
            rule = SelectionRule.from_config(select)
        else:
            return "rule n/a"
    except (SelectionError, TypeError):  # a hand-edited file
        return "rule n/a"
    diversity = _get(run, "diversity")
    if isinstance(diversity, Mapping) and rule.diversity is None:
        with contextlib.suppress(SelectionError, TypeError):
            rule = dataclasses.replace(rule, diversity=Diversity(**diversity))
    return rule.describe() + (", decided adaptively" if _get(run, "mode") == "adaptive" else "")


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _summary(config: Any, run: Any, metric: str, num: tuple[int, int | None], golden: Any) -> str:
    rule = _golden_rule(run, config)
    count = _get(run, "devices.count")
    kind = _get(run, "devices.kind") or _get(run, "devices.platform")
    devices = (
        NA if count is None else f"{count} x {kind or 'device'} ({_get(run, 'devices.processes') or 1} process(es))"
    )
    gflops = _number(_get(run, "flops_per_s"))
    tasks = _get(run, "counts.tasks") or num[1]
    parameters = _number(_get(run, "model.parameters"))
    return (
        f"Model {_code(_get(run, 'model.path') or _get(config, 'model.path'))} "
        f"({_get(run, 'model.dtype') or _get(config, 'model.dtype') or NA}, "
        f"{NA if parameters is None else f'{parameters / 1e6:.1f}M'} parameters) scored "
        f"**{_get(run, 'counts.candidates') or num[0]} candidates x {tasks or NA} tasks** "
        f"(pool {_code(_get(config, 'data.pool'))}, tasks {_code(_get(config, 'data.tasks'))}, "
        f"preset {_code(_get(config, 'preset'))}). Candidates are ranked by **{metric}**; the golden set "
        f"holds **{len(golden) if isinstance(golden, list) else NA}** records ({rule}). "
        f"Wall time {_fmt(_number(_get(run, 'wall_s')), '.1f')} s on {devices}: "
        f"{_fmt(_number(_get(run, 'pairs_per_s')), '.2f')} candidate-task pairs/s, "
        f"{_fmt(_number(_get(run, 'tokens_per_s')), '.1f')} tokens/s, "
        f"{NA if gflops is None else f'{gflops / 1e9:.1f}'} GFLOP/s achieved.\n"
    )


def _shown(record: dict) -> tuple[str, str, bool]:
    """(prompt, response, is a conversation) of a record as the report shows it: a conversation's
    turns before its last response, "role: text" each."""
    if not any(record.get(key) for key in ("messages", "conversations", "history", "system")):
        prompt = "\n".join(str(record[key]) for key in ("instruction", "input") if record.get(key))
        return prompt, str(record.get("output", "")), False
    try:
        (parsed,) = data_lib.records_from_objects([("report", record)], "report")
    except data_lib.DataError:
        return "", "", True
    last = max(k for k, (role, _) in enumerate(parsed.messages) if role == "assistant")
    turns = " | ".join(f"{role}: {text.strip()}" for role, text in parsed.messages[:last])
    return turns, parsed.messages[last][1], True


def _examples(lines: list[dict], order: Sequence[int], values: dict[str, np.ndarray], by_id: dict | None) -> str:
    header = ["rank", "id", *values]
    shown = {}
    if by_id is not None:
        shown = {index: _shown(by_id.get(str(lines[index].get("id")), {})) for index in order}
        chat = any(conversation for _, _, conversation in shown.values())
        header += ["turns before the last response", "last response"] if chat else ["instruction", "output"]
    rows = []
    for index in order:
        row = [str(index + 1), _cell(lines[index].get("id", NA))]
        row += [_fmt(array[index]) for array in values.values()]
        if by_id is not None:
            prompt, response, _ = shown[index]
            row += [_cell(prompt, _TEXT_CHARS) or NA, _cell(response, _TEXT_CHARS) or NA]
        rows.append(row)
    return plots_lib.markdown_table(header, rows)


def _corruption(
    values: dict[str, np.ndarray], metric: str, kinds: np.ndarray, in_golden: np.ndarray, plots: pathlib.Path
) -> str:
    labels = [CLEAN] + sorted({kind for kind in kinds.tolist() if kind != CLEAN})
    clean = kinds == CLEAN
    rows = []
    for name, array in values.items():
        row = [name]
        for label in [None, *labels[1:]]:  # None: clean against every corrupted record
            keep = np.isfinite(array) & ((clean | (kinds == label)) if label is not None else True)
            row.append(_fmt(auroc(array[keep], clean[keep]), ".3f"))
        rows.append(row)
    ranks = np.arange(1, kinds.size + 1)
    kind_rows = []
    for label in labels:
        mask = kinds == label
        golden = f"{(in_golden & mask).sum() / in_golden.sum():.1%}" if in_golden.any() else NA
        median = np.median(_finite(values[metric][mask])) if np.isfinite(values[metric][mask]).any() else None
        kind_rows.append(
            [_cell(label), str(int(mask.sum())), f"{mask.mean():.1%}", golden, f"{ranks[mask].mean():.1f}"]
            + [_fmt(median)]
        )
    image = plots_lib.corruption_boxplot(values[metric], kinds, labels, metric, plots / "corruption.png")
    return (
        "## Corruption\n\nAUROC of clean (positive) against corrupted records for each metric: 1.0 means "
        "every clean record scores above every corrupted one, 0.5 is chance (ties count 1/2).\n\n"
        + plots_lib.markdown_table(
            ["metric", "clean vs all corrupted"] + [f"clean vs {_cell(label)}" for label in labels[1:]], rows
        )
        + "\n"
        + plots_lib.markdown_table(
            ["kind", "records", "share of pool", "share of golden set", "mean rank", f"median {metric}"],
            kind_rows,
        )
        + f"\n![{metric} by corruption kind]({image})\n"
    )


def _read_scores(path: pathlib.Path) -> dict[str, np.ndarray] | str:
    """The arrays of scores.npz the per-task view needs, or why that view cannot be drawn."""
    if not path.is_file():
        return "scores.npz not found."
    with np.load(path) as data:
        missing = [key for key in ("zero_logp", "n_tokens", "one_logp") if key not in data.files]
        if missing:
            return f"scores.npz lacks {', '.join(missing)}."
        scores = {key: np.asarray(data[key], np.float64) for key in ("zero_logp", "n_tokens", "one_logp")}
        # Absent, or an object array that would need pickle: tasks are then named by position.
        with contextlib.suppress(KeyError, ValueError):
            scores["task_ids"] = data["task_ids"]
    num_tasks = scores["n_tokens"].shape
    if scores["zero_logp"].shape != num_tasks or scores["one_logp"].shape[1:] != num_tasks:
        return f"scores.npz shapes do not match: n_tokens {num_tasks}, one_logp {scores['one_logp'].shape}."
    if scores.get("task_ids", scores["n_tokens"]).shape != num_tasks:
        del scores["task_ids"]
    return scores


def _tasks(scores: Mapping[str, np.ndarray], plots: pathlib.Path) -> str:
    zero = np.asarray(scores["zero_logp"], np.float64)  # [T]
    n_tokens = np.asarray(scores["n_tokens"], np.float64)  # [T]
    one = np.asarray(scores["one_logp"], np.float64)  # [C, T]
    one = one[~np.isnan(one).any(axis=1)]  # unscored candidates (adaptive runs) have NaN rows
    ids = np.asarray(scores["task_ids"]).tolist() if "task_ids" in scores else list(range(zero.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_token = np.where(n_tokens > 0, zero / n_tokens, np.nan)  # [T]
        wins, gain = np.full(zero.size, np.nan), np.full(zero.size, np.nan)  # [T]
        if one.shape[0]:
            wins, gain = (one > zero).mean(axis=0), ((one - zero) / np.where(n_tokens > 0, n_tokens, np.nan)).mean(0)
    positions = np.arange(zero.size)
    order = np.lexsort((positions, -np.nan_to_num(wins, nan=-1.0)))  # most often helped first
    hardest = np.lexsort((positions, np.nan_to_num(wins, nan=2.0)))[:5]
    header = ["task", "tokens", "zero-shot logp/token", "fraction beating zero-shot", "mean logp gain/token"]

    def rows(indices):
        return [
            [_cell(ids[i]), _fmt(n_tokens[i], ".0f"), _fmt(per_token[i], ".3f"), _fmt(wins[i], ".3f")]
            + [_fmt(gain[i], ".3f")]
            for i in indices
        ]

    mean_per_token = _fmt(np.mean(_finite(per_token)), ".3f") if np.isfinite(per_token).any() else NA
    image = plots_lib.task_win_fractions([str(ids[i]) for i in order], wins[order], plots / "task_win_fraction.png")
    return (
        f"## Per-task view\n\n{zero.size} tasks, {one.shape[0]} fully scored candidates. "
        f"Mean zero-shot log-prob per token {mean_per_token}.\n\n"
        "Tasks where demonstrations help most often:\n\n"
        + plots_lib.markdown_table(header, rows(order[:5]))
        + "\nTasks where demonstrations help least often:\n\n"
        + plots_lib.markdown_table(header, rows(hardest))
        + f"\n![fraction of candidates beating zero-shot per task]({image})\n"
    )


def _run_details(run: Any) -> str:
    if not isinstance(run, Mapping):
        return "## Run details\n\nrun.json not found: no timings, buckets or cuts to report.\n"
    wall = _number(run.get("wall_s"))
    timings = [["wall", _fmt(wall, ".2f"), "100.0%" if wall else NA]]
    for key in ("load_s", "tokenize_s", "compile_s", "zero_shot_s", "one_shot_s", "write_s"):
        seconds = _number(_get(run, f"timings.{key}"))
        share = f"{seconds / wall:.1%}" if seconds is not None and wall else NA
        timings.insert(-1, [key.removesuffix("_s"), _fmt(seconds, ".2f"), share])
    prefix = _get(run, "buckets.prefix")
    settings = [["cuts." + key, _fmt(_get(run, f"cuts.{key}"))] for key in _CUT_KEYS]
    settings += [["buckets.prefix", ", ".join(map(str, prefix)) if isinstance(prefix, list) else NA]]
    settings += [["buckets." + key, _fmt(_get(run, f"buckets.{key}"))] for key in _BUCKET_KEYS]
    settings += [[key, _fmt(_get(run, key))] for key in _RUN_KEYS]
    return (
        "## Run details\n\n"
        + plots_lib.markdown_table(["setting", "value"], settings)
        + "\n"
        + plots_lib.markdown_table(["stage", "seconds", "share of wall"], timings)
    )


def _metrics_section(values: dict[str, np.ndarray], metric: str) -> str:
    rows = []
    for name, array in values.items():
        finite = _finite(array)
        stats = [np.mean, np.std, np.min, np.median, np.max] if finite.size else []
        cells = [_fmt(stat(finite)) for stat in stats] or [NA] * 5
        rows.append([f"**{name}**" if name == metric else name, *cells, str(array.size - finite.size)])
    win = values.get("win_rate")
    return (
        "## Metrics\n\nOver all candidates, higher is better; the ranking metric is in bold and "
        '"unscored" counts candidates without a value.\n\n'
        + plots_lib.markdown_table(["metric", "mean", "std", "min", "median", "max", "unscored"], rows)
        + "\n"
        + "".join(f"- `{name}`: {FORMULAS.get(name, NA)}\n" for name in values)
        + f"\nFraction of candidates with win_rate > 0.5: {NA if win is None else f'{np.mean(win > 0.5):.1%}'}\n"
    )


def _plots_section(values: dict[str, np.ndarray], metric: str, kinds, cut: float | None, plots) -> str:
    names = list(values)
    images = [
        plots_lib.metric_histogram(
            values[name], kinds, name, cut if name == metric else None, plots / f"hist_{name}.png"
        )
        for name in names
    ]
    matrix = np.array([[spearman(values[a], values[b]) for b in names] for a in names])  # [M, M]
    title = "Spearman rank correlation between metrics"
    images.append(plots_lib.correlation_heatmap(names, matrix, title, plots / "metric_correlation.png"))
    images.append(plots_lib.metric_scatter(values, metric, kinds, plots / "metric_scatter.png"))
    rows = [[name, *(_fmt(rho, ".3f") for rho in row)] for name, row in zip(names, matrix, strict=True)]
    return (
        "## Plots\n\n"
        + "".join(f"![{pathlib.Path(image).stem}]({image})\n\n" for image in images)
        + "Spearman rank correlation between metrics:\n\n"
        + plots_lib.markdown_table(["", *names], rows)
    )


def write_report(
    workdir: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]] | None = None,
    metric: str | None = None,
) -> pathlib.Path:
    """Writes workdir/report.md and its plots under workdir/plots/.

    Args:
      workdir: a scoring run's workdir; needs ranking.jsonl, every other file is optional.
      records: the pool records (dicts as in the input file, known by "id" or else by position), for
        the instruction and output of the best and worst candidates; None shows ids only.
      metric: the metric to rank by; defaults to config.json's "metric", else "win_rate".

    Returns:
      The path of report.md.

    Raises:
      ReportError: no ranking.jsonl, an unknown metric, or a file that is not valid JSON.
    """
    workdir = pathlib.Path(workdir)
    if not (workdir / "ranking.jsonl").is_file():
        raise ReportError(f"{workdir}: ranking.jsonl not found; run the scoring into this workdir first")
    lines = read_ranking(workdir / "ranking.jsonl")
    config, run = _read_json(workdir / "config.json"), _read_json(workdir / "run.json")
    try:
        golden_file = golden_path(workdir)
    except SelectionError:  # no golden set: its size prints as n/a
        golden_file = None
    if golden_file is None or golden_file.name == "golden.json":
        golden = _read_json(workdir / "golden.json")
    else:
        golden = read_golden(golden_file, keep_scores=True)  # with the "nuggets" ranks the report marks
    scores = _read_scores(workdir / "scores.npz")  # arrays, or the reason there are none
    run_metric = _get(config, "metric")
    metric = metric or run_metric or "win_rate"
    names = [name for name in (*METRICS, *BASELINES) if any(name in line for line in lines)]
    if metric not in names:
        raise ReportError(f"metric {metric!r} is not in ranking.jsonl; it has: {', '.join(names) or 'none'}")
    golden_ranks = {_get(item, "nuggets.rank") for item in golden} if isinstance(golden, list) else set()
    in_golden = np.array([line.get("rank") in golden_ranks for line in lines], dtype=bool)
    # Reorder by the report's metric: a no-op for the run's own metric, whose file order it is.
    order = rank_order(np.array([_float(line.get(metric)) for line in lines]))
    lines, in_golden = [lines[i] for i in order], in_golden[order]
    values = {name: np.array([_float(line.get(name)) for line in lines]) for name in names}  # name -> [C]
    cut = None  # the golden set was chosen by the run's metric; its cut means nothing on another one
    if metric == (run_metric or metric):
        cut = float(values[metric][in_golden].min()) if in_golden.any() else _number(_get(config, "select.threshold"))
    kinds = None
    if any("corruption" in line for line in lines):
        kinds = np.array([CLEAN if line.get("corruption") is None else str(line["corruption"]) for line in lines])
    plots = workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)

    num_tasks = scores["n_tokens"].size if isinstance(scores, dict) else None
    parts = ["# Nuggets scoring report\n", _summary(config, run, metric, (len(lines), num_tasks), golden)]
    parts += [_metrics_section(values, metric), _plots_section(values, metric, kinds, cut, plots)]
    if kinds is not None:
        parts.append(_corruption(values, metric, kinds, in_golden, plots))
    by_id = None if records is None else {str(record.get("id", i)): record for i, record in enumerate(records)}
    count = min(5, len(lines))
    parts.append(
        f"## Best and worst candidates\n\nBy {metric}; text truncated to {_TEXT_CHARS} characters.\n\n"
        f"Best {count}:\n\n"
        + _examples(lines, range(count), values, by_id)
        + f"\nWorst {count}:\n\n"
        + _examples(lines, range(len(lines) - 1, len(lines) - 1 - count, -1), values, by_id)
    )
    parts.append(_tasks(scores, plots) if isinstance(scores, dict) else f"## Per-task view\n\n{scores}\n")
    parts.append(_run_details(run))
    path = workdir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
