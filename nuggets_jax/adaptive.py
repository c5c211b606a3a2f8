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

The interval is a confidence sequence for the mean of a finite population sampled without
replacement (the betting / capital-process construction of Waudby-Smith and Ramdas, "Confidence
sequences for sampling without replacement", NeurIPS 2020): for a hypothesised mean m the
capital of a bettor on "the next task's value is above (below) the mean of the tasks not yet
seen" is a nonnegative martingale when m is the true mean, so by Ville's inequality it exceeds
1/alpha at any round with probability at most alpha. It holds at every round at once (no union
over rounds), accounts for the finite population (it shrinks to the exact value once all T tasks
are seen), and adapts to the variance of the values. Each candidate gets alpha = (1 -
confidence) / C, a union bound over candidates, so every decision of a run holds together with
probability at least `confidence`.

The bettor needs each per-task value inside a known range [low, high]:
- win_rate: [0, 1] (exact).
- token_acc_gain: [min_t -zero_correct/n, max_t 1 - zero_correct/n] (exact, from the zero-shot pass).
- mean_logp_gain: unbounded below; ASSUMED to lie in the range of the values seen at the first
  decision widened by `range_margin` times their spread on each side, capped above by the exact
  bound max_t -zero_logp/n (one_logp <= 0). A later value outside the range widens it from that
  round on; decisions already made stand. The guarantee holds only when the assumption does.

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
    """

    confidence: float = 0.9
    initial_tasks: int = 10
    tasks_per_round: int = 10
    seed: int = 0
    grid: int = 201
    range_margin: float = 0.5

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


def round_columns(num_tasks: int, config: AdaptiveConfig) -> list[np.ndarray]:
    """The task columns of each round: one seeded permutation of all tasks, cut every tasks_per_round."""
    order = np.random.default_rng(config.seed).permutation(num_tasks)
    k = config.tasks_per_round
    return [np.sort(order[i : i + k]).astype(np.int64) for i in range(0, num_tasks, k)]


def visit_order(num_tasks: int, config: AdaptiveConfig) -> np.ndarray:
    """[T] task columns in the order the rounds visit them (columns within a round sorted)."""
    return np.concatenate(round_columns(num_tasks, config))


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
    """(low, high) every per-task value surely lies in; None where the metric has no such bound."""
    n = np.asarray(n_tokens, np.float64)
    if metric == "win_rate":
        return 0.0, 1.0
    if metric == "token_acc_gain":
        zc = np.asarray(zero_correct, np.float64) / n
        return float((-zc).min()), float((1 - zc).max())
    # one_logp <= 0, so the gain is at most the zero-shot loss per token; there is no lower bound.
    return None, float((-np.asarray(zero_logp, np.float64) / n).max())


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
    alpha: float  # per-candidate miscoverage
    num_tasks: int

    @property
    def pairs_scored(self) -> int:
        return int(self.tasks_scored.sum())

    @property
    def pairs_exact(self) -> int:
        return int(self.tasks_scored.size * self.num_tasks)

    @property
    def compute_fraction(self) -> float:
        return self.pairs_scored / max(self.pairs_exact, 1)


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
    alpha = (1.0 - config.confidence) / c
    status = np.zeros(c, np.int8)
    seen = np.zeros(c, np.int64)
    lower, upper = np.full(c, -np.inf), np.full(c, np.inf)
    decided_round = np.full(c, -1, np.int64)
    how = np.full(c, "", dtype=object)
    order = np.concatenate(rounds)
    low, high = known
    trace = []
    done = False
    for r, cols in enumerate(rounds):
        active = np.flatnonzero(status == ACTIVE)
        missing = active[np.isnan(values[np.ix_(active, cols)]).any(axis=1)]
        if len(missing):
            if fetch is None:
                raise AdaptiveError(f"round {r}: {len(missing)} undecided candidate(s) lack scores and nothing can fetch them.")
            fetch(r, missing)
            if np.isnan(values[np.ix_(active, cols)]).any():
                raise AdaptiveError(f"round {r}: scoring left NaN values for undecided candidates.")
        seen[active] += len(cols)
        if r < first_decision:
            continue
        n = int(seen[active[0]])
        window = values[active][:, order[:n]]  # [A, n] in visit order
        low, high = _value_range(window, known, (low, high), config.range_margin)
        if n >= t:
            # Exact values in column order, bit-equal to metrics.compute_metric, so ties stay ties.
            lo = hi = values[active].mean(axis=1)
        else:
            lo, hi = confidence_interval(window, t, alpha, low, high, config.grid)
        # Intervals only ever shrink: every one of them holds on the same event (mu never rejected).
        lower[active] = np.maximum(lower[active], lo)
        upper[active] = np.minimum(upper[active], hi)
        status[active] = _rule_status(lower, upper, rule)[active]
        newly = active[status[active] != ACTIVE]
        decided_round[newly], how[newly] = r, "interval"
        done = _settle(status, rule, seen, t, values, order, decided_round, how, r)
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
    estimate = _estimates(values, seen, order)
    return Decisions(
        status=status,
        tasks_scored=seen,
        estimate=estimate,
        lower=np.where(np.isfinite(lower), lower, estimate),
        upper=np.where(np.isfinite(upper), upper, estimate),
        decided_round=decided_round,
        how=how.astype(str),
        selected=_selected(status, estimate, rule),
        rounds=trace,
        value_range=(float(low), float(high)),
        alpha=alpha,
        num_tasks=t,
    )


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


def _settle(status, rule, seen, t, values, order, decided_round, how, r) -> bool:
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


def _estimates(values: np.ndarray, seen: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Mean over the tasks each candidate saw; over all T in column order (bit-equal to metrics) when all."""
    c, t = values.shape
    estimate = np.full(c, np.nan)
    full = seen >= t
    estimate[full] = values[full].mean(axis=1)
    for n in np.unique(seen[~full & (seen > 0)]):
        rows = np.flatnonzero(seen == n)
        estimate[rows] = values[np.ix_(rows, order[:n])].mean(axis=1)
    return estimate


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
