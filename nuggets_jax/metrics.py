"""Golden scores of candidates: reductions of a score store over the tasks of a task set.

A score store is any mapping (a dict, or `np.load("scores.npz")`) with the arrays
`zero_logp [T]`, `zero_correct [T]`, `n_tokens [T]`, `one_logp [C, T]` and `one_correct [C, T]`
(docs/ARCHITECTURE.md, "Scores and metrics"). Every metric is oriented so that higher means a better candidate, is
computed in float64, and reduces over a chosen subset of task columns, so task-set sweeps are
column slices of one store and never rescore.

A candidate that is not scored yet (adaptive mode) has NaN in its `one_logp` row (and may have
NaN in `one_correct`); its metrics come out NaN instead of raising.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from nuggets_jax.errors import UserError

METRICS = ("win_rate", "mean_logp_gain", "mean_ppl_drop", "token_acc_gain")
# The metrics the adaptive mode decides on: those whose per-task range its intervals know or may
# assume (scoring/adaptive/intervals.known_range).
ADAPTIVE_METRICS = ("win_rate", "mean_logp_gain", "token_acc_gain")

METRIC_FORMULAS: dict[str, str] = {
    "win_rate": "mean over tasks t of [one_logp[c,t] > zero_logp[t]] (strict; the paper's golden score)",
    "mean_logp_gain": "mean over tasks t of (one_logp[c,t] - zero_logp[t]) / n_tokens[t]",
    "mean_ppl_drop": "mean over tasks t of exp(-zero_logp[t]/n_tokens[t]) - exp(-one_logp[c,t]/n_tokens[t])",
    "token_acc_gain": "mean over tasks t of (one_correct[c,t] - zero_correct[t]) / n_tokens[t]",
}

_STORE_KEYS = ("zero_logp", "zero_correct", "n_tokens", "one_logp", "one_correct")


class MetricError(UserError):
    """A metric name, task subset or score store that cannot be reduced."""


def _task_label(scores: Mapping[str, np.ndarray], column: int) -> str:
    """Names a task column by index and, when the store has them, by task id."""
    if "task_ids" in scores:
        task_ids = np.asarray(scores["task_ids"])
        if task_ids.shape[:1] == (np.asarray(scores["n_tokens"]).shape[0],):
            return f"task column {column} (id {task_ids[column].item()!r})"
    return f"task column {column}"


def _resolve_columns(columns: Sequence[int] | np.ndarray | None, num_tasks: int) -> np.ndarray:
    """Turns integer indices or a boolean mask into sorted-as-given integer indices [T_sel]."""
    if columns is None:
        selected = np.arange(num_tasks)
    else:
        columns = np.asarray(columns)
        if columns.ndim != 1:
            raise MetricError(f"columns must be 1-D task indices or a boolean mask, got shape {columns.shape}")
        if columns.dtype == np.bool_:
            if columns.shape[0] != num_tasks:
                raise MetricError(
                    f"boolean column mask has length {columns.shape[0]} but the score store has "
                    f"{num_tasks} task columns; pass one entry per task"
                )
            selected = np.flatnonzero(columns)
        elif columns.size == 0 or np.issubdtype(columns.dtype, np.integer):
            selected = columns.astype(np.int64)
            bad = selected[(selected < -num_tasks) | (selected >= num_tasks)]
            if bad.size:
                raise MetricError(
                    f"task column {int(bad[0])} is out of range: the score store has {num_tasks} task columns"
                )
            selected = selected % num_tasks
        else:
            raise MetricError(f"columns must be integer indices or a boolean mask, got dtype {columns.dtype}")
    if selected.size == 0:
        raise MetricError("the task subset is empty: select at least one task column")
    return selected


def _load_store(
    scores: Mapping[str, np.ndarray], columns: Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checks the store's arrays and returns them sliced to the columns, in float64."""
    missing = [key for key in _STORE_KEYS if key not in scores]
    if missing:
        raise MetricError(f"score store lacks {', '.join(missing)}; it needs {', '.join(_STORE_KEYS)} (see scores.npz)")
    zero_logp = np.asarray(scores["zero_logp"], dtype=np.float64)  # [T]
    zero_correct = np.asarray(scores["zero_correct"], dtype=np.float64)  # [T]
    n_tokens = np.asarray(scores["n_tokens"], dtype=np.float64)  # [T]
    one_logp = np.asarray(scores["one_logp"], dtype=np.float64)  # [C, T]
    one_correct = np.asarray(scores["one_correct"], dtype=np.float64)  # [C, T]
    if n_tokens.ndim != 1:
        raise MetricError(f"score store n_tokens must be [T], got shape {n_tokens.shape}")
    num_tasks = n_tokens.shape[0]
    for key, array in (("zero_logp", zero_logp), ("zero_correct", zero_correct)):
        if array.shape != (num_tasks,):
            raise MetricError(f"score store {key} has shape {array.shape}, expected [T] = ({num_tasks},)")
    for key, array in (("one_logp", one_logp), ("one_correct", one_correct)):
        if array.ndim != 2 or array.shape[1] != num_tasks:
            raise MetricError(f"score store {key} has shape {array.shape}, expected [C, T] with T = {num_tasks}")
    if one_logp.shape != one_correct.shape:
        raise MetricError(f"score store one_logp {one_logp.shape} and one_correct {one_correct.shape} differ in shape")
    selected = _resolve_columns(columns, num_tasks)
    n_selected = n_tokens[selected]
    bad = np.flatnonzero(~(n_selected > 0))
    if bad.size:
        column = int(selected[bad[0]])
        raise MetricError(
            f"{_task_label(scores, column)} has n_tokens = {n_tokens[column]:g}: a task must score at "
            "least one response token; drop it from the task subset or fix the task's response"
        )
    return (
        zero_logp[selected],
        zero_correct[selected],
        n_selected,
        one_logp[:, selected],
        one_correct[:, selected],
    )


def compute_metric(
    name: str, scores: Mapping[str, np.ndarray], columns: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Computes one golden score per candidate over a subset of task columns.

    Args:
      name: one of `METRICS`; see `METRIC_FORMULAS` for the formulas.
      scores: score store mapping (see module docstring).
      columns: integer indices or a boolean mask [T] of the task columns to reduce over; None
        means every task.

    Returns:
      [C] float64, higher is better; NaN for candidates whose scores hold NaN in these columns.

    Raises:
      MetricError: unknown metric, malformed store, empty subset, or n_tokens <= 0 in a used column.
    """
    if name not in METRICS:
        raise MetricError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
    return per_task(name, *_load_store(scores, columns)).mean(axis=1)


def per_task(
    name: str,
    zero_logp: np.ndarray,
    zero_correct: np.ndarray,
    n_tokens: np.ndarray,
    one_logp: np.ndarray,
    one_correct: np.ndarray,
) -> np.ndarray:
    """The per-task values of a metric, whose mean over tasks is the metric (`METRIC_FORMULAS`).

    Args:
      name: one of `METRICS`.
      zero_logp, zero_correct, n_tokens: [T] float64 (n_tokens > 0).
      one_logp, one_correct: [C, T] float64; NaN in one_logp marks an unscored pair.

    Returns:
      [C, T] float64; NaN where the pair is not scored.
    """
    if name == "win_rate":
        values = (one_logp > zero_logp).astype(np.float64)  # [C, T]
        # A comparison with NaN is False, which would count an unscored cell as a loss.
        values[np.isnan(one_logp) | np.isnan(zero_logp)] = np.nan
    elif name == "mean_logp_gain":
        values = (one_logp - zero_logp) / n_tokens
    elif name == "mean_ppl_drop":
        values = np.exp(-zero_logp / n_tokens) - np.exp(-one_logp / n_tokens)
    elif name == "token_acc_gain":
        values = (one_correct - zero_correct) / n_tokens
        # The store may keep integer counts (0) for unscored cells; one_logp is the NaN marker.
        values[np.isnan(one_logp)] = np.nan
    else:
        raise MetricError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
    return values


def compute_all(
    scores: Mapping[str, np.ndarray], columns: Sequence[int] | np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Computes every metric of `METRICS` over the same task columns.

    Args:
      scores: score store mapping.
      columns: task subset as in `compute_metric`.

    Returns:
      Metric name -> [C] float64, in the order of `METRICS`.
    """
    return {name: compute_metric(name, scores, columns) for name in METRICS}


# Baseline scores (Ivison et al. 2025 compare selectors against them): one pass per candidate, no
# task set (`scoring.baselines` computes the arrays). Oriented like the metrics: higher ranks first.
BASELINES = ("perplexity", "ifd", "response_ppl", "length", "random")
BASELINE_FORMULAS: dict[str, str] = {
    "perplexity": "exp(-cond_logp[c] / cond_tokens[c]): the response's perplexity after its prompt",
    "ifd": "PPL(response | prompt) / PPL(response alone) (Cherry_LLM's IFD); NaN when >= baselines.ifd_max",
    "response_ppl": "exp(-resp_logp[c] / resp_tokens[c]): the response's perplexity without its prompt",
    "length": "response tokens before any cut",
    "random": "uniform in [0, 1), seeded by baselines.seed",
}
# Per candidate: summed response log-probs after the prompt and alone, their token counts, the length.
BASELINE_ARRAYS = ("cond_logp", "cond_tokens", "resp_logp", "resp_tokens", "length")


def baseline_scores(arrays: Mapping[str, np.ndarray], seed: int = 0, ifd_max: float = 1.0) -> dict[str, np.ndarray]:
    """Every baseline score [C] (float64, `BASELINE_FORMULAS`) from the pass's arrays (`BASELINE_ARRAYS`).

    A candidate without a response token to score alone has NaN `response_ppl` and `ifd`.
    """
    cond_logp = np.asarray(arrays["cond_logp"], np.float64)
    resp_logp = np.asarray(arrays["resp_logp"], np.float64)
    cond_n = np.asarray(arrays["cond_tokens"], np.float64)
    resp_n = np.asarray(arrays["resp_tokens"], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cond_nll, resp_nll = -cond_logp / cond_n, np.where(resp_n > 0, -resp_logp / resp_n, np.nan)
        ifd = np.exp(cond_nll - resp_nll)
        ifd = np.where(ifd < ifd_max, ifd, np.nan)
    return {
        "perplexity": np.exp(cond_nll),
        "ifd": ifd,
        "response_ppl": np.exp(resp_nll),
        "length": np.asarray(arrays["length"], np.float64),
        "random": np.random.default_rng(seed).random(cond_logp.size),
    }


def auroc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve: P(a random positive scores higher than a random negative).

    Ties count 1/2 (the Mann-Whitney U statistic divided by n_pos * n_neg), computed from
    average ranks in O(C log C).

    Args:
      scores: [C] values, higher meaning "more likely positive".
      positive: [C] booleans (or 0/1) marking the positive class.

    Returns:
      The AUROC in [0, 1]; NaN if either class is empty or any score is NaN.
    """
    values = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(positive)
    if values.ndim != 1 or labels.shape != values.shape:
        raise MetricError(
            f"auroc needs 1-D scores and labels of the same length, got {values.shape} and {labels.shape}"
        )
    if labels.dtype != np.bool_:
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise MetricError("auroc labels must be booleans or 0/1")
        labels = labels.astype(bool)
    num_pos = int(labels.sum())
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0 or np.isnan(values).any():
        return float("nan")
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Runs of equal values share the mean of the 1-based ranks they span.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    run_ranks = (starts + 1 + ends) / 2.0
    sorted_ranks = np.repeat(run_ranks, ends - starts)
    rank_of = np.empty_like(sorted_ranks)
    rank_of[order] = sorted_ranks
    u_statistic = rank_of[labels].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u_statistic / (num_pos * num_neg))


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rho (ties get average ranks) over the pairs where both values are finite.

    Returns:
      rho in [-1, 1]; NaN when fewer than two pairs are left or either side is constant (no ranking).
    """
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise MetricError(f"spearman needs two [C] vectors of the same length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)
