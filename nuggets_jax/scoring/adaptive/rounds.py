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

The statistics live in `adaptive_intervals` (per-task values; the exact "betting" interval and the
approximate "normal" one), the decision rule in `adaptive_rule` (pure numpy: `decide`, `simulate`,
the `union`, `panel` and `compare` settings) and the settings in `adaptive_config`; this module
scores the rounds through the engine and writes the outputs.

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
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax import select as select_lib
from nuggets_jax import store as store_lib
from nuggets_jax.data import TokenizedPrefixes
from nuggets_jax.scoring import engine as scoring
from nuggets_jax.scoring import one_shot as one_shot
from nuggets_jax.scoring.adaptive.config import AdaptiveConfig, AdaptiveError, round_columns
from nuggets_jax.scoring.adaptive.intervals import known_range, per_task_values
from nuggets_jax.scoring.adaptive.rule import IN, Decisions, Rule, decide

CHUNK_PREFIX = "adaptive-r"


@dataclasses.dataclass
class AdaptiveResult:
    """What `run_adaptive` returns; the first four fields mirror one_shot.OneShotResult."""

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
        deal = len(layout.groups) if engine.deal_groups else 0
        blocks = one_shot.plan_blocks(
            [int(i) for i in ordered], self.widths, engine.buckets, engine.slots, deal, engine.pair_flops
        )
        row_of = {int(c): i for i, c in enumerate(candidates)}
        logp = np.full((len(candidates), len(cols)), np.nan, np.float32)
        correct = np.zeros((len(candidates), len(cols)), np.int32)
        prefix = f"{CHUNK_PREFIX}{r:03d}-"
        seq = 1 + max((int(name.split("-")[-1]) for name in self.store.names(prefix)), default=-1)

        rows = []
        blocks_out = one_shot.pipelined(engine, blocks, self.prefixes, self.widths, layout)
        for b, (block, (block_logp, block_correct)) in enumerate(blocks_out):
            keep = one_shot.first_slots(block)
            mine, real = block[engine.local], keep[engine.local]
            block_logp, block_correct = block_logp[real][:, cols], block_correct[real][:, cols]  # [n, k]
            one_shot.check_finite(
                block_logp, [self.candidate_ids[i] for i in mine[real]], [self.task_ids[c] for c in cols]
            )
            rows.append((mine[real], block_logp, block_correct))
            for i, c in enumerate(mine[real]):
                logp[row_of[int(c)]], correct[row_of[int(c)]] = block_logp[i], block_correct[i]
            done = block[keep]
            self.stats.calls += 1 + engine.calls_per_block(one_shot.dealt_candidates(block), layout)
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

    Afterwards each such candidate has every task column, so `one_shot.run_one_shot` only scores
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
