"""The adaptive decision rule: replays the rounds on per-task values and decides whom it can.

Pure numpy, no engine: `decide` asks a `fetch` callback for the scores a round needs (the scoring
loop in `rounds`), `simulate` replays a run on fully known values. After each round every
undecided candidate gets an interval (`intervals`) for its final metric, the mean over all
T tasks, and the top-N rule decides: in when its lower bound is above the upper bound of all but at
most N - 1 others, out when its upper bound is below the lower bounds of at least N others; for a
threshold rule, in when lower >= threshold and out when upper < threshold.

`union=True` (default) gives each candidate alpha = (1 - confidence) / C (normal intervals also
divide by the number of decision rounds), a union bound, so every in/out decision of the run holds
together with probability >= confidence. `union=False` gives each interval alpha = 1 - confidence
(the betting one per candidate over the whole run, the normal one at each round): no joint
promise, but far fewer pairs; measured against exact scoring by `replay` (experiments/adaptive_eval.py).

`panel=P` scores P seeded reference candidates in every round and takes every interval for the
values minus the panel's mean on the same task (a paired comparison): ranking by that is ranking by
the metric, and it removes the task difficulty all candidates share from the noise, for P extra
candidates' worth of pairs (cheap in a large pool).

`compare="pairwise"` (normal intervals, top-N rules) goes further: the rule compares two
candidates through a Student-t interval for the difference of their metrics on the tasks both saw
(out: at least N of the 2N leading candidates are surely above; in: at most N - 1 others could be
above). The shared task difficulty cancels in each difference, and one interval of width ~sqrt(2)
replaces two of width 1 each; `union=True` then divides alpha by 4 N C and the decision rounds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from nuggets_jax import select as select_lib
from nuggets_jax.scoring.adaptive.config import AdaptiveConfig, AdaptiveError, round_columns, visit_order
from nuggets_jax.scoring.adaptive.intervals import confidence_interval, count_above, normal_interval

IN, OUT, ACTIVE = 1, -1, 0


@dataclasses.dataclass(frozen=True)
class Rule:
    """The golden-set rule: the best `top_n` candidates, or every candidate >= `threshold`."""

    top_n: int | None = None
    threshold: float | None = None

    @classmethod
    def from_selection(cls, selection: select_lib.SelectionRule, num_candidates: int) -> Rule:
        """The selection rule over a pool of `num_candidates` (a top fraction becomes its count)."""
        count = selection.count(num_candidates)
        return cls(top_n=count) if count is not None else cls(threshold=float(selection.threshold))


def target_rule(
    num_candidates: int, top_n: int | None = None, top_fraction: float | None = None, threshold: float | None = None
) -> Rule:
    """`Rule.from_selection` of `select.SelectionRule(top_n, top_fraction, threshold)`."""
    return Rule.from_selection(select_lib.SelectionRule(top_n, top_fraction, threshold), num_candidates)


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
    at most N - 1 others not out could be above (one already out cannot be above a top-N member).
    """
    undecided = np.flatnonzero(status == ACTIVE)
    estimate = np.full(len(status), -np.inf)
    for m in np.unique(seen[seen > 0]):
        rows = np.flatnonzero(seen == m)
        estimate[rows] = values[np.ix_(rows, order[:m])].mean(axis=1)
    contenders = np.flatnonzero(status != OUT)
    leaders = contenders[select_lib.rank_order(estimate[contenders])[: 2 * n]]
    new = status.copy()
    above = count_above(values, order, seen, undecided, leaders, alpha, t, surely=True)
    new[undecided[above >= n]] = OUT
    heads = np.intersect1d(undecided, leaders)
    could = count_above(values, order, seen, heads, contenders, alpha, t, surely=False)
    new[heads[could <= n - 1]] = IN
    return new


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
