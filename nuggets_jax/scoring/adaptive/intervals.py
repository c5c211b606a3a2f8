"""Per-task values of the adaptive metrics and the confidence intervals the decision rule takes of them.

Two intervals (`interval`):
- "betting" (default, exact): a confidence sequence for the mean of a finite population sampled
  without replacement (the betting / capital-process construction of Waudby-Smith and Ramdas,
  "Confidence sequences for sampling without replacement", NeurIPS 2020). For a hypothesised mean
  m, the capital of a bettor on "the next task's value is above (below) the mean of the tasks not
  yet seen" is a nonnegative martingale when m is the true mean, so by Ville's inequality it
  reaches 1/alpha at any round with probability at most alpha. It holds at every round at once (no
  union over rounds), accounts for the finite population (it shrinks to the exact value once all
  T tasks are seen) and adapts to the variance of the values. It needs every per-task value in a
  known range [low, high]:
  win_rate [0, 1] and token_acc_gain [min_t -zero_correct/n, max_t 1 - zero_correct/n] are exact;
  mean_logp_gain is unbounded below, so its range is ASSUMED: the values seen at the first
  decision, widened by `range_margin` times their spread on each side (a later value outside
  widens it from that round on; decisions already made stand). The guarantee holds only when the
  assumption does.
- "normal" (approximate): a Student-t interval with the finite-population correction (1 - n/T);
  by the central limit theorem, tighter than the exact one for few tasks, no range needed.


`count_above` is the pairwise form of the normal interval (`compare="pairwise"`): a Student-t
interval for the difference of two candidates' metrics on the tasks both saw.
"""

from __future__ import annotations

import math

import numpy as np

from nuggets_jax import metrics as metrics_lib
from nuggets_jax.scoring.adaptive.config import METRICS, AdaptiveError


def per_task_values(
    metric: str,
    one_logp: np.ndarray,
    one_correct: np.ndarray,
    zero_logp: np.ndarray,
    zero_correct: np.ndarray,
    n_tokens: np.ndarray,
) -> np.ndarray:
    """[C, T] float64 per-task values whose mean over tasks is the metric (`metrics.per_task`).

    Unscored pairs (NaN in one_logp) are NaN.
    """
    if metric not in METRICS:
        raise AdaptiveError(f"adaptive scoring supports metric {' | '.join(METRICS)}, got {metric!r}.")
    return metrics_lib.per_task(
        metric,
        np.asarray(zero_logp, np.float64),
        np.asarray(zero_correct, np.float64),
        np.asarray(n_tokens, np.float64),
        np.asarray(one_logp, np.float64),
        np.asarray(one_correct, np.float64),
    )


def known_range(metric: str, zero_logp: np.ndarray, zero_correct: np.ndarray, n_tokens: np.ndarray) -> tuple:
    """(low, high) every per-task value surely lies in; None for an end the bettor must assume."""
    n = np.asarray(n_tokens, np.float64)
    if metric == "win_rate":
        return 0.0, 1.0
    if metric == "token_acc_gain":
        zc = np.asarray(zero_correct, np.float64) / n
        return float((-zc).min()), float((1 - zc).max())
    # The gain is at most the zero-shot loss per token (one_logp <= 0), but that end is far too loose
    # to bet with, and there is no lower end: both are assumed from the values seen.
    return None, None


def confidence_interval(
    values: np.ndarray, num_tasks: int, alpha: float, low: float, high: float, grid: int = 201
) -> tuple[np.ndarray, np.ndarray]:
    """Time-uniform interval for the mean over all `num_tasks` tasks of each row's population.

    Args:
      values: [C, n] each row's first n values in visit order (a uniformly random order without
        replacement), every value in [low, high].
      num_tasks: T, the population size; n <= T.
      alpha: miscoverage of each row's interval, over every n at once.
      low, high: the range of the values.
      grid: hypothesised means tested inside the row's feasible range.

    Returns:
      lower [C], upper [C]; equal to the exact mean when n == T.
    """
    values = np.asarray(values, np.float64)
    c, n = values.shape
    t = num_tasks
    span = max(high - low, 1e-12)
    z = np.clip((values - low) / span, 0.0, 1.0)  # [C, n] in [0, 1]
    total = z.sum(axis=1)
    if n >= t:
        exact = low + span * total / t
        return exact, exact.copy()
    lower, upper = np.empty(c), np.empty(c)
    for start in range(0, c, 512):
        rows = slice(start, min(start + 512, c))
        lower[rows], upper[rows] = _betting_rows(z[rows], t, alpha, grid)
    return low + span * lower, low + span * upper


def _betting_rows(z: np.ndarray, t: int, alpha: float, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Hedged WoR capital process on [C, n] values in [0, 1] -> lower, upper of the population mean."""
    c, n = z.shape
    before = np.concatenate([np.zeros((c, 1)), np.cumsum(z, axis=1)[:, :-1]], axis=1)  # [C, n] sum of earlier
    seen = np.arange(1, n + 1, dtype=np.float64)  # i + 1 for the i-th value (0-based)
    # Predictable plug-in bet size from the values before each step (their regularised mean/variance).
    mean_before = (0.5 + before) / seen
    sq = (z - mean_before) ** 2
    var_before = (0.25 + np.concatenate([np.zeros((c, 1)), np.cumsum(sq, axis=1)[:, :-1]], axis=1)) / seen
    bet = np.sqrt(2.0 * math.log(2.0 / alpha) / (var_before * seen * np.log1p(seen)))  # [C, n]
    # Feasible means after n values: the unseen T - n lie in [0, 1].
    lo_feasible = before[:, -1] + z[:, -1]
    lo_w = lo_feasible / t
    hi_w = (lo_feasible + t - n) / t
    m = lo_w[:, None] + (hi_w - lo_w)[:, None] * np.linspace(0.0, 1.0, grid)[None]  # [C, G]
    log_up = np.zeros((c, grid))
    log_down = np.zeros((c, grid))
    rejected = np.zeros((c, grid), bool)
    threshold = math.log(1.0 / alpha)
    cap = 0.5  # bets at most half the way to ruin, so one bad step cannot zero the capital
    for i in range(n):
        # Mean of the tasks not yet seen before step i, if the population mean is m.
        rest = np.clip((t * m - before[:, i : i + 1]) / (t - i), 0.0, 1.0)
        with np.errstate(divide="ignore"):
            bet_up = np.minimum(bet[:, i : i + 1], cap / rest)
            bet_down = np.minimum(bet[:, i : i + 1], cap / (1.0 - rest))
        step = z[:, i : i + 1] - rest
        log_up += np.log1p(bet_up * step)
        log_down += np.log1p(-bet_down * step)
        # Hedged: half the capital on each side; either half reaching 1/alpha rejects m.
        rejected |= np.maximum(log_up, log_down) + math.log(0.5) >= threshold
    accepted = ~rejected
    rows = np.arange(c)
    first = np.argmax(accepted, axis=1)
    last = grid - 1 - np.argmax(accepted[:, ::-1], axis=1)
    # The accepted set is taken to be an interval; one grid step outwards covers a mean between points.
    lower = np.where(accepted.any(axis=1), m[rows, np.maximum(first - 1, 0)], lo_w)
    upper = np.where(accepted.any(axis=1), m[rows, np.minimum(last + 1, grid - 1)], hi_w)
    return lower, upper


def normal_interval(values: np.ndarray, num_tasks: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Student-t interval for the mean over `num_tasks` tasks from [C, n] values seen without replacement.

    The variance carries the finite-population correction (1 - n/T), so the interval shrinks to the
    exact mean at n = T. Each row's variance is shrunk towards the rows' pooled variance by one
    pseudo-observation, so a row of identical values (say 0 wins of 10) does not give a zero width.
    Approximate (central limit), unlike `confidence_interval`.
    """
    from scipy import stats

    values = np.asarray(values, np.float64)
    c, n = values.shape
    mean = values.mean(axis=1)
    if n >= num_tasks:
        return mean, mean.copy()
    squares = ((values - mean[:, None]) ** 2).sum(axis=1)  # [C]
    pooled = squares.sum() / max(c * (n - 1), 1)
    variance = (squares + pooled) / n  # (n - 1) degrees of freedom + 1 pseudo-observation
    half = stats.t.ppf(1 - alpha / 2, max(n - 1, 1)) * np.sqrt(variance * (1 - n / num_tasks) / n)
    return mean - half, mean + half


def count_above(
    values: np.ndarray,
    order: np.ndarray,
    seen: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    alpha: float,
    t: int,
    surely: bool,
    chunk: int = 256,
) -> np.ndarray:
    """Per row: how many of `cols` (itself excluded) are surely, or could be, above it.

    Each (row, col) pair gets a Student-t interval (finite-population corrected) for the metric of
    col minus the metric of row on the tasks both saw; the rows all saw the most tasks.

    Args:
      values: [C, T] per-task values.
      order: [T] the visit order; a candidate that saw m tasks saw order[:m].
      seen: [C] tasks seen per candidate.
      rows: [A] candidates to count for.
      cols: [K] candidates to compare each row with.
      alpha: miscoverage of each pair's interval.
      t: T, the number of tasks.
      surely: True: count cols whose interval lies above 0 (surely above); False: cols whose upper
        end reaches 0 (could be above).
      chunk: rows per matrix product (memory).

    Returns:
      [A] int64 counts.
    """
    from scipy import stats

    counts = np.zeros(len(rows), np.int64)
    n = int(seen[rows].max()) if len(rows) else 0
    common = np.minimum(seen[cols], n)  # [K] tasks each column shares with the rows
    for m in np.unique(common):
        which = cols[common == m]
        if m < 2:
            counts += 0 if surely else np.array([(which != r).sum() for r in rows], np.int64)
            continue
        b = values[np.ix_(which, order[:m])]  # [K_m, m]
        b_mean = b.mean(axis=1)
        b_dev = b - b_mean[:, None]
        b_sq = (b_dev**2).sum(axis=1)
        quantile = stats.t.ppf(1 - alpha / 2, m - 1)
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            a = values[np.ix_(part, order[:m])]  # [A, m]
            a_mean = a.mean(axis=1)
            a_dev = a - a_mean[:, None]
            # Squared deviations of the per-task differences, shrunk towards their mean by one pseudo-task.
            squares = np.maximum((a_dev**2).sum(axis=1)[:, None] + b_sq[None] - 2 * a_dev @ b_dev.T, 0.0)
            variance = (squares + squares.mean() / (m - 1)) / m  # [A, K_m]
            half = quantile * np.sqrt(variance * (1 - m / t) / m)
            diff = b_mean[None] - a_mean[:, None]
            hit = diff - half > 0 if surely else diff + half >= 0
            hit &= part[:, None] != which[None]
            counts[start : start + chunk] += hit.sum(axis=1)
    return counts
