"""Adaptive scoring: the golden set of an exact run from a fraction of the candidate x task pairs.

Tasks are visited in one seeded random permutation shared by every candidate, cut into rounds of
`tasks_per_round` tasks. Every candidate gets the first `initial_tasks`; after that each round goes
only to the candidates still undecided. After each round every undecided candidate gets a
confidence interval for its final metric, the mean over all T tasks, and the top-N rule decides
whom it can:

- in: its lower bound is above the upper bound of all but at most N - 1 others;
- out: its upper bound is below the lower bounds of at least N others (below the N-th largest
  lower bound); for a threshold rule, in when lower >= threshold and out when upper < threshold.

The run stops when the golden set is decided, or when the undecided candidates have every task,
whose exact values then settle the rest as exact ranking would (value, then position).

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

`union=True` (default) gives each candidate alpha = (1 - confidence) / C (normal intervals also
divide by the number of decision rounds), a union bound, so every in/out decision of the run holds
together with probability >= confidence. `union=False` gives each interval alpha = 1 - confidence
(the betting one per candidate over the whole run, the normal one at each round): no joint
promise, but far fewer pairs; measured against exact scoring in experiments/adaptive_eval.py.

`panel=P` scores P seeded reference candidates in every round and takes every interval for the
values minus the panel's mean on the same task (a paired comparison): ranking by that is ranking by
the metric, and it removes the task difficulty all candidates share from the noise, for P extra
candidates' worth of pairs (cheap in a large pool).

`compare="pairwise"` (normal intervals, top-N rules) goes further: the rule compares two
candidates through a Student-t interval for the difference of their metrics on the tasks both saw
(out: at least N of the 2N leading candidates are surely above; in: at most N - 1 others could be
above). The shared task difficulty cancels in each difference, and one interval of width ~sqrt(2)
replaces two of width 1 each; `union=True` then divides alpha by 4 N C and the decision rounds.

Scores are stored as chunks "adaptive-r{round:03d}-{seq:06d}" (candidates [n], columns [k],
one_logp [n, k], one_correct [n, k]) through the run's ScoreStore; the decisions are a
deterministic function of the stored scores, so a rerun replays them and continues where it
stopped, and `complete` later scores exactly the missing rounds so that an exact run
(`scoring.run_one_shot`) finds nothing left to do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax import scoring
from nuggets_jax import select as select_lib
from nuggets_jax import store as store_lib
from nuggets_jax.data import TokenizedPrefixes

METRICS = ("win_rate", "mean_logp_gain", "token_acc_gain")
IN, OUT, ACTIVE = 1, -1, 0
CHUNK_PREFIX = "adaptive-r"


class AdaptiveError(ValueError):
    """A config, selection rule or store the adaptive mode cannot use; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """Knobs of the adaptive mode (`config.adaptive.*`).

    Attributes:
      confidence: probability that every in/out decision of the run is right (union over candidates).
      initial_tasks: tasks every candidate gets before the first decision (rounded up to whole rounds).
      tasks_per_round: tasks given per round to each undecided candidate.
      seed: seed of the task permutation.
      grid: hypothesised means tested per interval (resolution of the interval ends).
      range_margin: widening of the observed value range, for metrics without a known range.
      union: True: every decision of the run holds together with probability >= confidence (each
        interval at (1 - confidence) / C). False: each candidate's interval holds with probability
        >= confidence on its own, with no joint promise; much cheaper, see the module docstring.
      interval: "betting" (exact: holds for any values in the range) or "normal" (Student-t with
        the finite-population correction: approximate, tighter for few tasks).
      panel: reference candidates (seeded) scored in every round; intervals are then taken for the
        values relative to the panel's mean on each task, which removes the task difficulty all
        candidates share (paired comparison). 0 = none.
      compare: "candidate": the rule compares each candidate's own interval with the others'.
        "pairwise" (normal intervals, top-N rules): it compares two candidates through an interval
        for the difference of their metrics on the tasks both saw, whose noise is far smaller (the
        task difficulty they share cancels, and one interval replaces two).
    """

    confidence: float = 0.9
    initial_tasks: int = 10
    tasks_per_round: int = 10
    seed: int = 0
    grid: int = 201
    range_margin: float = 0.5
    union: bool = True
    interval: str = "betting"
    panel: int = 0
    compare: str = "candidate"

    def __post_init__(self):
        if not 0.0 < self.confidence < 1.0:
            raise AdaptiveError(f"adaptive.confidence must be in (0, 1), got {self.confidence}.")
        if self.tasks_per_round < 1 or self.initial_tasks < 1:
            raise AdaptiveError(
                f"adaptive.tasks_per_round and adaptive.initial_tasks must be at least 1, got "
                f"{self.tasks_per_round} and {self.initial_tasks}."
            )
        if self.grid < 3:
            raise AdaptiveError(f"adaptive.grid must be at least 3, got {self.grid}.")
        if self.range_margin < 0:
            raise AdaptiveError(f"adaptive.range_margin must be >= 0, got {self.range_margin}.")
        if self.interval not in ("betting", "normal"):
            raise AdaptiveError(f"adaptive.interval must be betting or normal, got {self.interval!r}.")
        if self.panel < 0:
            raise AdaptiveError(f"adaptive.panel must be >= 0, got {self.panel}.")
        if self.compare not in ("candidate", "pairwise"):
            raise AdaptiveError(f"adaptive.compare must be candidate or pairwise, got {self.compare!r}.")
        if self.compare == "pairwise" and self.interval != "normal":
            raise AdaptiveError("adaptive.compare=pairwise needs adaptive.interval=normal.")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AdaptiveConfig:
        """From `config.adaptive` (a ConfigDict or dict); unknown keys are an error."""
        values = dict(values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise AdaptiveError(f"unknown adaptive config field(s) {unknown}; known: {sorted(names)}.")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Rule:
    """The golden-set rule: the best `top_n` candidates, or every candidate >= `threshold`."""

    top_n: int | None = None
    threshold: float | None = None


def target_rule(
    num_candidates: int, top_n: int | None = None, top_fraction: float | None = None, threshold: float | None = None
) -> Rule:
    """The selection rule of `select.select` as a Rule (top_fraction becomes its count)."""
    if top_fraction is not None:
        # Same rounding as select.select (it reads the fraction as the decimal it prints as).
        return Rule(top_n=len(select_lib.select(np.zeros(num_candidates), top_fraction=top_fraction)))
    if top_n is not None:
        if top_n < 1:
            raise AdaptiveError(f"select.top_n must be at least 1, got {top_n}.")
        return Rule(top_n=min(int(top_n), num_candidates))
    if threshold is None:
        raise AdaptiveError("set one of select.top_n, select.top_fraction or select.threshold.")
    return Rule(threshold=float(threshold))


def visit_order(num_tasks: int, config: AdaptiveConfig) -> np.ndarray:
    """[T] the seeded permutation of the task columns that every candidate follows."""
    return np.random.default_rng(config.seed).permutation(num_tasks).astype(np.int64)


def round_columns(num_tasks: int, config: AdaptiveConfig) -> list[np.ndarray]:
    """The task columns of each round (sorted): the visit order cut every tasks_per_round tasks."""
    order, k = visit_order(num_tasks, config), config.tasks_per_round
    return [np.sort(order[i : i + k]) for i in range(0, num_tasks, k)]


def per_task_values(
    metric: str,
    one_logp: np.ndarray,
    one_correct: np.ndarray,
    zero_logp: np.ndarray,
    zero_correct: np.ndarray,
    n_tokens: np.ndarray,
) -> np.ndarray:
    """[C, T] float64 per-task values whose mean over tasks is the metric (as metrics.compute_metric).

    Unscored pairs (NaN in one_logp) are NaN.
    """
    one = np.asarray(one_logp, np.float64)
    zero = np.asarray(zero_logp, np.float64)
    n = np.asarray(n_tokens, np.float64)
    if metric == "win_rate":
        values = (one > zero).astype(np.float64)
    elif metric == "mean_logp_gain":
        values = (one - zero) / n
    elif metric == "token_acc_gain":
        values = (np.asarray(one_correct, np.float64) - np.asarray(zero_correct, np.float64)) / n
    else:
        raise AdaptiveError(f"adaptive scoring supports metric {' | '.join(METRICS)}, got {metric!r}.")
    values[np.isnan(one)] = np.nan
    return values


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


@dataclasses.dataclass
class Decisions:
    """The state of an adaptive run after replaying its rounds (all arrays [C])."""

    status: np.ndarray  # int8: IN, OUT (ACTIVE only while running)
    tasks_scored: np.ndarray  # int64: tasks the rule saw for each candidate
    estimate: np.ndarray  # float64: mean over the tasks seen (the exact metric when all T were seen)
    lower: np.ndarray  # float64: interval for the mean over all T tasks
    upper: np.ndarray
    decided_round: np.ndarray  # int64: round after which the candidate was decided
    how: np.ndarray  # str: "interval", "fill" (the rest once the set was decided) or "exact"
    selected: np.ndarray  # [N] int64 golden set, in rank order of the estimate
    rounds: list[dict[str, Any]]  # per round: tasks seen, undecided before, in/out after, pairs so far
    value_range: tuple[float, float]
    alpha: float  # per-candidate miscoverage (per round too for normal intervals)
    num_tasks: int
    panel: np.ndarray  # [P] the reference candidates (empty without a panel)

    @property
    def pairs_scored(self) -> int:
        return int(self.tasks_scored.sum())

    @property
    def pairs_exact(self) -> int:
        return int(self.tasks_scored.size * self.num_tasks)

    @property
    def compute_fraction(self) -> float:
        return self.pairs_scored / max(self.pairs_exact, 1)


def panel_members(num_candidates: int, config: AdaptiveConfig) -> np.ndarray:
    """The seeded reference candidates scored in every round (sorted; empty when config.panel is 0)."""
    if config.panel <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([config.seed, 1])
    return np.sort(rng.choice(num_candidates, min(config.panel, num_candidates), replace=False)).astype(np.int64)


def decide(
    values: np.ndarray,
    rule: Rule,
    config: AdaptiveConfig,
    fetch: Callable[[int, np.ndarray], None] | None = None,
    known: tuple[float | None, float | None] = (0.0, 1.0),
    log: Callable[[str], None] = lambda message: None,
) -> Decisions:
    """Replays the rounds: reveals each round's tasks to the undecided candidates, then decides.

    Args:
      values: [C, T] per-task values; NaN = not scored yet. The rule only ever looks at the
        rounds each candidate took part in, so extra stored scores do not change its decisions.
      rule: the golden-set rule.
      config: rounds, confidence and interval settings.
      fetch: fetch(round, candidates) must fill values[candidates][:, round columns] when any is
        NaN (it scores them); None means every needed value must already be present.
      known: the exact (low, high) range of the per-task values; None for an end without one.
      log: progress messages.

    Returns:
      The decisions (golden set, intervals, tasks scored per candidate, per-round trace).
    """
    c, t = values.shape
    rounds = round_columns(t, config)
    first_decision = min(len(rounds), math.ceil(config.initial_tasks / config.tasks_per_round)) - 1
    alpha = 1.0 - config.confidence
    if config.union:
        alpha /= c
        if config.interval == "normal":
            alpha /= len(rounds) - first_decision  # a fixed-time interval, looked at in every decision round
    # Pairwise: each round compares every undecided candidate with the 2N leaders and each undecided
    # leader with everyone, at most 4 N C intervals.
    pair_alpha = 1.0 - config.confidence
    if config.compare == "pairwise":
        if rule.top_n is None:
            raise AdaptiveError("adaptive.compare=pairwise ranks candidates; use select.top_n or top_fraction.")
        if config.union:
            pair_alpha /= 4 * rule.top_n * c * (len(rounds) - first_decision)
    panel = panel_members(c, config)
    if len(panel) and rule.top_n is None:
        raise AdaptiveError(
            "adaptive.panel compares candidates with each other; it needs select.top_n or top_fraction."
        )
    if len(panel):
        # Values relative to the panel's mean on the same task lie in [low - high, high - low].
        span = None if None in known else known[1] - known[0]
        known = (None, None) if span is None else (-span, span)
    status = np.zeros(c, np.int8)
    seen = np.zeros(c, np.int64)
    # Intervals for the mean over all T tasks of the values minus the panel's mean on each task (the
    # metric itself when there is no panel): one shift for every candidate, so they compare directly.
    lower, upper = np.full(c, -np.inf), np.full(c, np.inf)
    decided_round = np.full(c, -1, np.int64)
    how = np.full(c, "", dtype=object)
    # The interval reads each candidate's values in the permutation's order: it needs them in a
    # uniformly random order, which a round's columns sorted by index are not.
    order = visit_order(t, config)
    low, high = known
    # Betting intervals hold at every round at once; normal ones only with the union over rounds.
    joint_over_rounds = config.interval == "betting" or config.union
    trace = []
    for r, cols in enumerate(rounds):
        active = np.flatnonzero(status == ACTIVE)
        scored = np.union1d(active, panel)
        missing = scored[np.isnan(values[np.ix_(scored, cols)]).any(axis=1)]
        if len(missing):
            if fetch is None:
                raise AdaptiveError(f"round {r}: {len(missing)} candidate(s) lack scores; nothing can score them.")
            fetch(r, missing)
            if np.isnan(values[np.ix_(scored, cols)]).any():
                raise AdaptiveError(f"round {r}: scoring left NaN values for undecided candidates.")
        seen[scored] += len(cols)
        if r < first_decision:
            continue
        n = int(seen[active[0]])
        base = values[np.ix_(panel, order[:n])].mean(axis=0) if len(panel) else 0.0  # [n]
        window = values[np.ix_(active, order[:n])] - base  # [A, n] in visit order
        low, high = _value_range(window, known, (low, high), config.range_margin)
        if n >= t:
            # Exact values; win rates are sums of 0/1, so equal ones compare equal and ties stay ties.
            lo = hi = values[active].mean(axis=1) - np.mean(base)
        elif config.interval == "normal":
            lo, hi = normal_interval(window, t, alpha)
        else:
            lo, hi = confidence_interval(window, t, alpha, low, high, config.grid)
        if joint_over_rounds:
            # A candidate's intervals of all rounds hold together, so their intersection holds too.
            # Disjoint ones mean that failed (likely only at a low confidence); keep the newest then.
            lo, hi = _intersect(lower[active], upper[active], lo, hi)
        lower[active], upper[active] = lo, hi
        if config.compare == "pairwise" and n < t:
            status[active] = _pairwise_status(values, order, seen, status, rule.top_n, pair_alpha, t)[active]
        else:
            status[active] = _rule_status(lower, upper, rule)[active]
        if rule.top_n is not None:
            _keep_sizes(status, active, lower, upper, rule.top_n)
        newly = active[status[active] != ACTIVE]
        decided_round[newly], how[newly] = r, "interval"
        done = _settle(status, rule, seen, t, values, decided_round, how, r)
        trace.append(
            {
                "round": r,
                "tasks_seen": n,
                "undecided_before": int(len(active)),
                "in": int((status == IN).sum()),
                "out": int((status == OUT).sum()),
                "pairs": int(seen.sum()),
            }
        )
        log(
            f"adaptive round {r}: {n}/{t} tasks, {len(active)} undecided -> {trace[-1]['in']} in, "
            f"{trace[-1]['out']} out, {int(seen.sum())} pairs ({seen.sum() / (c * t):.1%} of exact)"
        )
        if done:
            break
    estimate, shift = _estimates(values, seen, order, panel)
    return Decisions(
        status=status,
        tasks_scored=seen,
        estimate=estimate,
        lower=np.where(np.isfinite(lower), lower + shift, estimate),
        upper=np.where(np.isfinite(upper), upper + shift, estimate),
        decided_round=decided_round,
        how=how.astype(str),
        selected=_selected(status, estimate, rule),
        rounds=trace,
        value_range=(float(low), float(high)),
        alpha=alpha,
        num_tasks=t,
        panel=panel,
    )


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


def _intersect(lower, upper, new_lower, new_upper) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.maximum(lower, new_lower), np.minimum(upper, new_upper)
    failed = lo > hi
    return np.where(failed, new_lower, lo), np.where(failed, new_upper, hi)


def _value_range(window: np.ndarray, known: tuple, current: tuple, margin: float) -> tuple[float, float]:
    """The range the bettor assumes: the exact ends where known, else the observed range widened.

    An assumed end only ever widens (when a value beyond it shows up), so it depends only on the
    values seen so far.
    """
    seen_low, seen_high = float(window.min()), float(window.max())
    spread = max(seen_high - seen_low, 1e-6)
    low, high = current
    if known[0] is not None:
        low = known[0]
    elif low is None or seen_low < low:
        low = seen_low - margin * spread
    if known[1] is not None:
        high = known[1]
    elif high is None or seen_high > high:
        high = seen_high + margin * spread
    return float(low), float(high)


def _rule_status(lower: np.ndarray, upper: np.ndarray, rule: Rule) -> np.ndarray:
    """[C] IN / OUT / ACTIVE from the intervals alone (every candidate, decided or not)."""
    if rule.threshold is not None:
        return np.where(lower >= rule.threshold, IN, np.where(upper < rule.threshold, OUT, ACTIVE)).astype(np.int8)
    n = rule.top_n
    # rivals_above[c]: others whose upper bound reaches c's lower bound (could end above c).
    sorted_upper = np.sort(upper)
    could_beat = len(upper) - np.searchsorted(sorted_upper, lower, side="left")
    could_beat -= (upper >= lower).astype(np.int64)  # not itself
    sorted_lower = np.sort(lower)
    surely_above = len(lower) - np.searchsorted(sorted_lower, upper, side="right")
    surely_above -= (lower > upper).astype(np.int64)
    status = np.full(len(lower), ACTIVE, np.int8)
    status[could_beat <= n - 1] = IN
    status[surely_above >= n] = OUT
    return status


def _pairwise_status(
    values: np.ndarray, order: np.ndarray, seen: np.ndarray, status: np.ndarray, n: int, alpha: float, t: int
) -> np.ndarray:
    """[C] IN / OUT / ACTIVE from intervals of differences of candidates' metrics (paired, normal).

    Out: at least N of the 2N leaders (best estimates not out) are surely above. In: a leader that
    at most N - 1 others could be above.
    """
    undecided = np.flatnonzero(status == ACTIVE)
    estimate = np.full(len(status), -np.inf)
    for m in np.unique(seen[seen > 0]):
        rows = np.flatnonzero(seen == m)
        estimate[rows] = values[np.ix_(rows, order[:m])].mean(axis=1)
    contenders = np.flatnonzero(status != OUT)
    leaders = contenders[select_lib.rank_order(estimate[contenders])[: 2 * n]]
    new = status.copy()
    above = _count_pairs(values, order, seen, undecided, leaders, alpha, t, surely=True)
    new[undecided[above >= n]] = OUT
    heads = np.intersect1d(undecided, leaders)
    could = _count_pairs(values, order, seen, heads, np.arange(len(status)), alpha, t, surely=False)
    new[heads[could <= n - 1]] = IN
    return new


def _count_pairs(values, order, seen, rows, cols, alpha, t, surely: bool, chunk: int = 256) -> np.ndarray:
    """Per row: how many of `cols` (itself excluded) are surely above it (interval of col - row > 0),
    or could be above it (upper end >= 0), on the tasks both saw (rows all saw the most)."""
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


def _keep_sizes(status: np.ndarray, active: np.ndarray, lower: np.ndarray, upper: np.ndarray, n: int) -> None:
    """At most N in and C - N out: more only happens when some interval failed (a low confidence).

    The surplus among this round's decisions goes back to undecided: the least sure first (lowest
    lower bound among the new "in", highest upper bound among the new "out").
    """
    for side, room, sure in ((IN, n, -lower), (OUT, len(status) - n, upper)):
        surplus = int((status == side).sum()) - room
        if surplus > 0:
            new = active[status[active] == side]
            status[new[np.argsort(sure[new], kind="stable")[::-1][:surplus]]] = ACTIVE


def _settle(status, rule, seen, t, values, decided_round, how, r) -> bool:
    """Closes the run when the rule allows it; True when nothing is left undecided."""
    active = np.flatnonzero(status == ACTIVE)
    if not len(active):
        return True
    if rule.top_n is not None:
        chosen = int((status == IN).sum())
        if chosen >= rule.top_n or chosen + len(active) <= rule.top_n:
            status[active] = OUT if chosen >= rule.top_n else IN
            decided_round[active], how[active] = r, "fill"
            return True
    if (seen[active] >= t).all():
        # Every task seen: exact values, exact ranking (value, then position) settles the rest.
        exact = values[active].mean(axis=1)
        if rule.threshold is not None:
            status[active] = np.where(exact >= rule.threshold, IN, OUT)
        else:
            room = rule.top_n - int((status == IN).sum())
            ranked = active[select_lib.rank_order(exact)]
            status[ranked[:room]], status[ranked[room:]] = IN, OUT
        decided_round[active], how[active] = r, "exact"
        return True
    return False


def _estimates(values: np.ndarray, seen: np.ndarray, order: np.ndarray, panel: np.ndarray) -> tuple:
    """[C] estimates of the metric, and the shift from panel-relative intervals back to the metric.

    A candidate that saw all T tasks gets its exact value. Otherwise: the mean over the tasks it saw;
    with a panel, the mean relative to the panel on those tasks plus the panel's mean over every
    task it saw (the longest sample), which corrects for how hard the candidate's tasks were.
    """
    c, t = values.shape
    estimate = np.full(c, np.nan)
    full = seen >= t
    estimate[full] = values[full].mean(axis=1)
    shift = 0.0
    if len(panel):
        longest = order[: int(seen[panel].max())]
        shift = float(values[np.ix_(panel, longest)].mean())  # the panel's mean over the tasks it saw
    for n in np.unique(seen[~full & (seen > 0)]):
        rows = np.flatnonzero((seen == n) & ~full)
        estimate[rows] = values[np.ix_(rows, order[:n])].mean(axis=1)
        if len(panel):
            estimate[rows] += shift - values[np.ix_(panel, order[:n])].mean()
    return estimate, shift


def _selected(status: np.ndarray, estimate: np.ndarray, rule: Rule) -> np.ndarray:
    chosen = np.flatnonzero(status == IN)
    chosen = chosen[select_lib.rank_order(estimate[chosen])]
    # More than N "in" only if some interval failed; keep the N best estimates then.
    return chosen[: rule.top_n] if rule.top_n is not None else chosen


def simulate(
    values: np.ndarray, rule: Rule, config: AdaptiveConfig, known: tuple[float | None, float | None] = (0.0, 1.0)
) -> Decisions:
    """The decisions an adaptive run would make on fully known per-task values [C, T] (no scoring)."""
    return decide(np.asarray(values, np.float64), rule, config, fetch=None, known=known)


@dataclasses.dataclass
class AdaptiveResult:
    """What `run_adaptive` returns; the first four fields mirror scoring.OneShotResult."""

    one_logp: np.ndarray  # [C, T] float32, NaN = not scored
    one_correct: np.ndarray  # [C, T] int32, 0 where not scored
    stats: scoring.PassStats  # what this invocation computed
    resumed_candidates: int  # candidates with stored scores at the start
    decisions: Decisions


def load_scores(store: store_lib.ScoreStore, num_candidates: int, num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """Every stored one-shot chunk of every process: one_logp [C, T] (NaN = not scored), one_correct [C, T]."""
    logp = np.full((num_candidates, num_tasks), np.nan, np.float32)
    correct = np.zeros((num_candidates, num_tasks), np.int32)
    for path in sorted(store.root.glob("process_*/*.npz")):
        if path.stem == "zero":
            continue
        chunk = store.read(path.stem, process_index=int(path.parent.name.split("_")[1]))
        cols = chunk["columns"] if "columns" in chunk else np.arange(num_tasks)
        logp[np.ix_(chunk["candidates"], cols)] = chunk["one_logp"]
        correct[np.ix_(chunk["candidates"], cols)] = chunk["one_correct"]
    return logp, correct


def check_store_rounds(store: store_lib.ScoreStore, rounds: Sequence[np.ndarray]) -> None:
    """Refuses stored round chunks cut with other rounds (another adaptive.seed or tasks_per_round)."""
    for path in sorted(store.root.glob(f"process_*/{CHUNK_PREFIX}*.npz")):
        r = int(path.stem[len(CHUNK_PREFIX) :].split("-")[0])
        cols = store.read(path.stem, process_index=int(path.parent.name.split("_")[1]))["columns"]
        if r >= len(rounds) or not np.array_equal(np.sort(cols), rounds[r]):
            raise AdaptiveError(
                f"{path}: round {r} was scored on other task columns than adaptive.seed / adaptive.tasks_per_round "
                "give now; rerun with the settings of the run that wrote it, or use another --workdir."
            )


def _check_engine(engine: scoring.Engine, rounds: Sequence[np.ndarray]) -> None:
    layouts = engine.subset_layouts
    same = len(layouts) == len(rounds) and all(
        np.array_equal(np.sort(np.concatenate([g.tasks[g.tasks >= 0] for g in lay.groups])), cols)
        for lay, cols in zip(layouts, rounds, strict=False)
    )
    if not same:
        raise AdaptiveError(
            "the Engine's column_sets are not the adaptive rounds; build it with "
            "column_sets=adaptive.round_columns(num_tasks, config)."
        )


def _round_flops(engine: scoring.Engine, prefix_length: int, columns: np.ndarray) -> float:
    """Model FLOPs of one candidate on one round: its prefix, then the round's tasks (as Engine.pair_flops)."""
    cfg = engine.model_config
    body, head = cfg.flops_per_token(lm_head=False), cfg.flops_per_token() - cfg.flops_per_token(False)
    p = prefix_length
    flops = p * body + cfg.attention_flops(p, (p + 1) / 2)
    for col in columns:
        n, start = len(engine.tasks.ids[col]), int(engine.tasks.response_start[col])
        flops += n * body + (n - start) * head + cfg.attention_flops(n, p + (n + 1) / 2)
    return flops


class _RoundScorer:
    """Scores one round's tasks for some candidates through the engine and stores the chunks."""

    def __init__(self, engine, prefixes, store, candidate_ids, task_ids, chunk_candidates, bar):
        self.engine, self.prefixes, self.store = engine, prefixes, store
        self.candidate_ids, self.task_ids = candidate_ids, task_ids
        self.blocks_per_chunk = max(1, chunk_candidates // engine.slots)
        self.bar = bar
        self.stats = scoring.PassStats()
        self.widths = np.asarray([engine.bucket_width(len(p)) for p in prefixes.ids])

    def score(self, r: int, cols: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """one_logp [n, k], one_correct [n, k] of `candidates` on round r's columns `cols`."""
        engine, layout = self.engine, self.engine.subset_layouts[r]
        t0 = time.perf_counter()
        # Same block plan as the exact run: by prefix bucket, then position.
        ordered = candidates[np.lexsort((candidates, self.widths[candidates]))]
        blocks = scoring.plan_blocks([int(i) for i in ordered], self.widths, engine.buckets, engine.slots)
        row_of = {int(c): i for i, c in enumerate(candidates)}
        logp = np.full((len(candidates), len(cols)), np.nan, np.float32)
        correct = np.zeros((len(candidates), len(cols)), np.int32)
        prefix = f"{CHUNK_PREFIX}{r:03d}-"
        seq = 1 + max((int(name.split("-")[-1]) for name in self.store.names(prefix)), default=-1)

        def dispatch(block):
            # Every process passes the global block's width, so all of them run the same program.
            width = int(max(self.widths[i] for i in block if i >= 0))
            mine = [self.prefixes.ids[i] if i >= 0 else None for i in block[engine.local]]
            return engine.dispatch_block(mine, layout, width=width)

        pending = dispatch(blocks[0]) if blocks else None
        rows = []
        for b, block in enumerate(blocks):
            current = pending
            # Dispatch block b + 1 before reading block b back: the host works while the devices compute.
            pending = dispatch(blocks[b + 1]) if b + 1 < len(blocks) else None
            block_logp, block_correct = engine.collect_block(current)
            mine = block[engine.local]
            real = mine >= 0
            block_logp, block_correct = block_logp[real][:, cols], block_correct[real][:, cols]  # [n, k]
            scoring.check_finite(
                block_logp, [self.candidate_ids[i] for i in mine[real]], [self.task_ids[c] for c in cols]
            )
            rows.append((mine[real], block_logp, block_correct))
            for i, c in enumerate(mine[real]):
                logp[row_of[int(c)]], correct[row_of[int(c)]] = block_logp[i], block_correct[i]
            done = block[block >= 0]
            self.stats.calls += 1 + len(layout.groups)
            self.stats.candidates += len(done)
            self.stats.pairs += len(done) * len(cols)
            self.stats.task_tokens += len(done) * layout.real_tokens
            self.stats.scored_tokens += len(done) * layout.scored_tokens
            self.stats.flops += sum(_round_flops(engine, len(self.prefixes.ids[i]), cols) for i in done)
            self.bar.update(len(done) * len(cols))
            if (b + 1) % self.blocks_per_chunk == 0 or b + 1 == len(blocks):
                self.store.write(
                    f"{prefix}{seq:06d}",
                    candidates=np.concatenate([x[0] for x in rows]).astype(np.int64),
                    columns=np.asarray(cols, np.int64),
                    one_logp=np.concatenate([x[1] for x in rows]),
                    one_correct=np.concatenate([x[2] for x in rows]),
                )
                seq += 1
                rows = []
        self.stats.wall_s += time.perf_counter() - t0
        return _merge_rows(logp, correct)


def _merge_rows(logp: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each process scored its own slots (NaN elsewhere); every process needs all rows to decide."""
    import jax

    if jax.process_count() == 1:
        return logp, correct
    from jax.experimental import multihost_utils

    all_logp = np.asarray(multihost_utils.process_allgather(logp))  # [P, n, k]
    all_correct = np.asarray(multihost_utils.process_allgather(correct))
    owner = np.argmax(~np.isnan(all_logp).all(axis=2), axis=0)
    rows = np.arange(logp.shape[0])
    return all_logp[owner, rows], all_correct[owner, rows]


def _progress_bar(total: int, initial: int, progress: bool, desc: str):
    import jax
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="pair",
        desc=desc,
        disable=not progress or jax.process_index() != 0,
        smoothing=0.05,
        dynamic_ncols=True,
    )


def run_adaptive(
    engine: scoring.Engine,
    prefixes: TokenizedPrefixes,
    store: store_lib.ScoreStore,
    candidate_ids: Sequence[str],
    task_ids: Sequence[str],
    zero_logp: np.ndarray,
    zero_correct: np.ndarray,
    n_tokens: np.ndarray,
    metric: str,
    rule: Rule,
    config: AdaptiveConfig,
    chunk_candidates: int = 64,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> AdaptiveResult:
    """Scores round by round until the golden set is decided; resumes from the store.

    Args:
      engine: built with column_sets=round_columns(num_tasks, config).
      prefixes: the tokenized pool.
      store: the run's ScoreStore; its chunks (exact or adaptive) are reused, new rounds saved.
      candidate_ids, task_ids: for messages.
      zero_logp, zero_correct, n_tokens: [T] the zero-shot pass.
      metric: win_rate | mean_logp_gain | token_acc_gain.
      rule: the golden-set rule (`target_rule`).
      config: the adaptive settings.
      chunk_candidates: candidates per saved chunk.
      progress: show a progress bar (pairs, out of the exact run's).
      log: messages.

    Returns:
      The scores held now (NaN where never scored), this invocation's stats and the decisions.
    """
    c, t = len(prefixes.ids), engine.num_tasks
    rounds = round_columns(t, config)
    _check_engine(engine, rounds)
    check_store_rounds(store, rounds)
    logp, correct = load_scores(store, c, t)
    stored = ~np.isnan(logp)
    resumed = int(stored.any(axis=1).sum())
    if resumed:
        log(f"resuming: {int(stored.sum())} stored pairs of {resumed} candidate(s) in {store.root}")
    values = per_task_values(metric, logp, correct, zero_logp, zero_correct, n_tokens)
    bar = _progress_bar(c * t, int(stored.sum()), progress, "adaptive")
    scorer = _RoundScorer(engine, prefixes, store, candidate_ids, task_ids, chunk_candidates, bar)

    def fetch(r: int, candidates: np.ndarray) -> None:
        cols = rounds[r]
        round_logp, round_correct = scorer.score(r, cols, candidates)
        logp[np.ix_(candidates, cols)], correct[np.ix_(candidates, cols)] = round_logp, round_correct
        values[np.ix_(candidates, cols)] = per_task_values(
            metric, round_logp, round_correct, zero_logp[cols], zero_correct[cols], np.asarray(n_tokens)[cols]
        )

    decisions = decide(values, rule, config, fetch, known_range(metric, zero_logp, zero_correct, n_tokens), log)
    bar.close()
    log(
        f"adaptive: golden set of {len(decisions.selected)} decided with {decisions.pairs_scored} of "
        f"{decisions.pairs_exact} pairs ({decisions.compute_fraction:.1%}); this run scored {scorer.stats.pairs}"
    )
    return AdaptiveResult(logp, correct, scorer.stats, resumed, decisions)


def complete(
    engine: scoring.Engine,
    prefixes: TokenizedPrefixes,
    store: store_lib.ScoreStore,
    candidate_ids: Sequence[str],
    task_ids: Sequence[str],
    config: AdaptiveConfig,
    chunk_candidates: int = 64,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> scoring.PassStats:
    """Scores every partially scored candidate on exactly its missing rounds (saved as round chunks).

    Afterwards each such candidate has every task column, so `scoring.run_one_shot` only scores
    candidates the store does not hold at all; nothing stored is computed again.

    Args:
      engine: built with column_sets=round_columns(num_tasks, config) (the adaptive run's rounds).
      prefixes, store, candidate_ids, task_ids, chunk_candidates, progress, log: as in run_adaptive.
      config: the adaptive settings of the run that wrote the store.

    Returns:
      What this call computed.
    """
    c, t = len(prefixes.ids), engine.num_tasks
    rounds = round_columns(t, config)
    _check_engine(engine, rounds)
    check_store_rounds(store, rounds)
    logp, _ = load_scores(store, c, t)
    scored = ~np.isnan(logp)
    partial = scored.any(axis=1) & ~scored.all(axis=1)
    todo = [(r, np.flatnonzero(partial & ~scored[:, cols].all(axis=1))) for r, cols in enumerate(rounds)]
    total = sum(len(cands) * len(rounds[r]) for r, cands in todo)
    log(f"completing {int(partial.sum())} partially scored candidate(s): {total} missing pairs")
    bar = _progress_bar(total, 0, progress, "complete")
    scorer = _RoundScorer(engine, prefixes, store, candidate_ids, task_ids, chunk_candidates, bar)
    for r, candidates in todo:
        if len(candidates):
            scorer.score(r, rounds[r], candidates)
    bar.close()
    return scorer.stats


def report_rows(decisions: Decisions, candidate_ids: Sequence[Any]) -> list[dict[str, Any]]:
    """One dict per candidate, best estimate first: the content of adaptive.jsonl."""
    ranks = select_lib.ranks(decisions.estimate)
    rows = []
    for i in select_lib.rank_order(decisions.estimate):
        rows.append(
            {
                "rank": int(ranks[i]),
                "id": candidate_ids[i],
                "status": "in" if decisions.status[i] == IN else "out",
                "decided_by": str(decisions.how[i]),
                "decided_round": int(decisions.decided_round[i]),
                "tasks_scored": int(decisions.tasks_scored[i]),
                "estimate": _json_float(decisions.estimate[i]),
                "lower": _json_float(decisions.lower[i]),
                "upper": _json_float(decisions.upper[i]),
            }
        )
    return rows


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def summary(decisions: Decisions, config: AdaptiveConfig, rule: Rule) -> dict[str, Any]:
    """run.json's additions: pairs_scored, pairs_exact, compute_fraction and an "adaptive" section."""
    how, counts = np.unique(decisions.how, return_counts=True)
    return {
        "pairs_scored": decisions.pairs_scored,
        "pairs_exact": decisions.pairs_exact,
        "compute_fraction": decisions.compute_fraction,
        "adaptive": {
            **dataclasses.asdict(config),
            "rule": {k: v for k, v in dataclasses.asdict(rule).items() if v is not None},
            "alpha_per_candidate": decisions.alpha,
            "value_range": list(decisions.value_range),
            "selected": int(len(decisions.selected)),
            "decided_by": {str(h): int(n) for h, n in zip(how, counts, strict=True)},
            "rounds": decisions.rounds,
        },
    }


def write_outputs(
    workdir: str | pathlib.Path,
    records: Sequence[Mapping[str, Any]],
    decisions: Decisions,
    metric: str,
    config: AdaptiveConfig,
    rule: Rule,
) -> dict[str, Any]:
    """Writes golden.json, ranking.jsonl (by the adaptive estimate) and adaptive.jsonl; returns `summary`.

    golden.json and ranking.jsonl carry, besides the estimate as `metric`, the interval
    (`adaptive_lower`, `adaptive_upper`) and `adaptive_tasks` (tasks scored).
    """
    workdir = pathlib.Path(workdir)
    columns = {
        metric: decisions.estimate,
        "adaptive_lower": decisions.lower,
        "adaptive_upper": decisions.upper,
        "adaptive_tasks": decisions.tasks_scored.astype(np.float64),
    }
    select_lib.write_ranking(workdir / "ranking.jsonl", records, columns, metric)
    select_lib.write_golden(workdir / "golden.json", records, decisions.selected, columns, metric)
    ids = [r.get("id", i) for i, r in enumerate(records)]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in report_rows(decisions, ids))
    store_lib.atomic_write_bytes(workdir / "adaptive.jsonl", text.encode())
    return summary(decisions, config, rule)
