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

The statistics live in `adaptive.intervals` (per-task values; the exact "betting" interval and the
approximate "normal" one), the decision rule in `adaptive.rule` (pure numpy: `decide`, `simulate`,
the `union`, `panel` and `compare` settings) and the settings in `adaptive.config`; this module
scores the rounds through the block loop (`scoring.blocks`, shared with the exact pass) and writes
the outputs.

Scores are stored as chunks "adaptive-r{round:03d}-{seq:06d}" (candidates [n], columns [k],
one_logp [n, k], one_correct [n, k]) through the run's ScoreStore; the decisions are a
deterministic function of the stored scores, so a rerun replays them and continues where it
stopped, and `complete` later scores exactly the missing rounds so that an exact run
(`one_shot.run_one_shot`) finds nothing left to do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax import select as select_lib
from nuggets_jax import sharding
from nuggets_jax import store as store_lib
from nuggets_jax.data import TokenizedPrefixes
from nuggets_jax.scoring import engine as scoring
from nuggets_jax.scoring.adaptive.config import AdaptiveConfig, AdaptiveError, round_columns
from nuggets_jax.scoring.adaptive.intervals import known_range, per_task_values
from nuggets_jax.scoring.adaptive.rule import IN, Decisions, Rule, decide
from nuggets_jax.scoring.blocks import BlockScorer, plan_blocks, progress_bar

CHUNK_PREFIX = "adaptive-r"


@dataclasses.dataclass
class AdaptiveResult:
    """What `run_adaptive` returns; the first four fields mirror one_shot.OneShotResult."""

    one_logp: np.ndarray  # [C, T] float32, NaN = not scored
    one_correct: np.ndarray  # [C, T] int32, 0 where not scored
    stats: scoring.PassStats  # what this invocation computed
    resumed_candidates: int  # candidates with stored scores at the start
    decisions: Decisions


def check_store_rounds(store: store_lib.ScoreStore, rounds: Sequence[np.ndarray]) -> None:
    """Refuses stored round chunks cut with other rounds (another adaptive.seed or tasks_per_round)."""
    for process_index, name in store.every_process_names(CHUNK_PREFIX):
        r = int(name[len(CHUNK_PREFIX) :].split("-")[0])
        cols = store.read(name, process_index)["columns"]
        if r >= len(rounds) or not np.array_equal(np.sort(cols), rounds[r]):
            raise AdaptiveError(
                f"{store.path(name, process_index)}: round {r} was scored on other task columns than "
                "adaptive.seed / adaptive.tasks_per_round give now; rerun with the settings of the run that "
                "wrote it, or use another --workdir."
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
    """Model FLOPs of one candidate on one round: its prefix, then the round's tasks (`ModelConfig.candidate_flops`)."""
    lengths = [len(engine.tasks.ids[col]) for col in columns]
    return engine.model_config.candidate_flops(prefix_length, lengths, engine.tasks.n_tokens[columns])


def _stored_rounds(engine, prefixes, store, config: AdaptiveConfig):
    """The rounds' task columns (checked against the engine and the stored chunks) and every process's
    stored scores: one_logp [C, T] (NaN = not scored), one_correct [C, T]."""
    rounds = round_columns(engine.num_tasks, config)
    _check_engine(engine, rounds)
    check_store_rounds(store, rounds)
    return (rounds, *store.load(len(prefixes.ids), engine.num_tasks, every_process=True))


class _RoundScorer(BlockScorer):
    """The block loop (`blocks.BlockScorer`) over one round's tasks for some candidates."""

    def score(self, r: int, cols: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """one_logp [n, k], one_correct [n, k] of `candidates` on round r's columns `cols`, on every process."""
        engine, layout = self.engine, self.engine.subset_layouts[r]
        # Same block plan as the exact run: by prefix bucket, then position.
        ordered = candidates[np.lexsort((candidates, self.widths[candidates]))]
        groups = self.deal_groups(layout)
        blocks = plan_blocks(
            [int(i) for i in ordered], self.widths, engine.buckets, engine.slots, groups, engine.pair_flops
        )
        rows = np.full(len(self.prefixes.ids), -1, np.int64)
        rows[candidates] = np.arange(len(candidates))
        logp = np.full((len(candidates), len(cols)), np.nan, np.float32)
        correct = np.zeros((len(candidates), len(cols)), np.int32)
        chunk_prefix = f"{CHUNK_PREFIX}{r:03d}-"

        def flops(prefix_length: int) -> float:
            return _round_flops(engine, prefix_length, cols)

        self.run(blocks, chunk_prefix, logp, correct, rows, flops, layout, cols)
        return sharding.merge_rows(logp, correct)


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
    rounds, logp, correct = _stored_rounds(engine, prefixes, store, config)
    stored = ~np.isnan(logp)
    resumed = int(stored.any(axis=1).sum())
    if resumed:
        log(f"resuming: {int(stored.sum())} stored pairs of {resumed} candidate(s) in {store.root}")
    values = per_task_values(metric, logp, correct, zero_logp, zero_correct, n_tokens)
    bar = progress_bar(logp.size, int(stored.sum()), progress, "adaptive")
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

    Afterwards each such candidate has every task column, so `one_shot.run_one_shot` only scores
    candidates the store does not hold at all; nothing stored is computed again.

    Args:
      engine: built with column_sets=round_columns(num_tasks, config) (the adaptive run's rounds).
      prefixes, store, candidate_ids, task_ids, chunk_candidates, progress, log: as in run_adaptive.
      config: the adaptive settings of the run that wrote the store.

    Returns:
      What this call computed.
    """
    rounds, logp, _ = _stored_rounds(engine, prefixes, store, config)
    scored = ~np.isnan(logp)
    partial = scored.any(axis=1) & ~scored.all(axis=1)
    todo = [(r, np.flatnonzero(partial & ~scored[:, cols].all(axis=1))) for r, cols in enumerate(rounds)]
    total = sum(len(cands) * len(rounds[r]) for r, cands in todo)
    log(f"completing {int(partial.sum())} partially scored candidate(s): {total} missing pairs")
    bar = progress_bar(total, 0, progress, "complete")
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
    source: str | pathlib.Path | None = None,
) -> dict[str, Any]:
    """Writes the golden set, ranking.jsonl (by the adaptive estimate) and adaptive.jsonl; returns `summary`.

    The golden set (golden.json, or the pool's format: `select.write_golden_as`; `source` is the
    pool path, None for a generated pool), ranking.jsonl (and ranking.parquet for a Parquet or
    datasets pool) carry, besides the estimate as `metric`, the interval (`adaptive_lower`,
    `adaptive_upper`) and `adaptive_tasks` (tasks scored).
    """
    workdir = pathlib.Path(workdir)
    columns = {
        metric: decisions.estimate,
        "adaptive_lower": decisions.lower,
        "adaptive_upper": decisions.upper,
        "adaptive_tasks": decisions.tasks_scored.astype(np.float64),
    }
    select_lib.write_ranking(workdir / "ranking.jsonl", records, columns, metric)
    select_lib.write_ranking_table(workdir, source, records, columns, metric)
    select_lib.write_golden_as(workdir, source, records, decisions.selected, columns, metric)
    ids = [r.get("id", i) for i, r in enumerate(records)]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in report_rows(decisions, ids))
    store_lib.atomic_write_bytes(workdir / "adaptive.jsonl", text.encode())
    return summary(decisions, config, rule)
