"""The exact pass over a pool: every candidate not yet in the store against every task.

The candidates go through the block loop (`blocks.BlockScorer`) in the plan of an uninterrupted
run (`blocks.blocks_to_run`), saved as chunks "one-{seq:06d}" (candidates [n], one_logp [n, T],
one_correct [n, T]). With several processes each one scores and saves its own slots, and the rows
are merged on every process at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from nuggets_jax import sharding
from nuggets_jax.data import TokenizedPrefixes
from nuggets_jax.scoring.blocks import BlockScorer, blocks_to_run, progress_bar
from nuggets_jax.scoring.engine import Engine, PassStats
from nuggets_jax.store import ScoreStore

CHUNK_PREFIX = "one-"


@dataclasses.dataclass
class OneShotResult:
    one_logp: np.ndarray  # [N, T] float32
    one_correct: np.ndarray  # [N, T] int32
    stats: PassStats
    resumed_candidates: int  # candidates found done in the store


def run_one_shot(
    engine: Engine,
    prefixes: TokenizedPrefixes,
    store: ScoreStore,
    candidate_ids: Sequence[str],
    task_ids: Sequence[str],
    chunk_candidates: int = 64,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> OneShotResult:
    """Scores every candidate not yet in `store` against every task, saving chunk by chunk.

    Candidates are sorted by prefix bucket (then position) into blocks of C; consecutive blocks
    form a chunk. Each process saves its own slots. Block b + 1 is dispatched before block b is
    read back, so the host assembles results while the devices compute.
    """
    n, t = len(prefixes.ids), engine.num_tasks
    logp, correct = store.load(n, t)
    done = ~np.isnan(logp).any(axis=1)
    resumed = int(done.sum())
    if resumed:
        chunks = len(store.names()) - store.has("zero")
        log(f"resuming: {resumed} of {n} candidates already scored ({chunks} chunk(s) in {store.dir})")
    done_anywhere = sharding.any_process(done)
    bar = progress_bar(n * t, int(done_anywhere.sum()) * t, progress, "one-shot")
    scorer = BlockScorer(engine, prefixes, store, candidate_ids, task_ids, chunk_candidates, bar)
    # Candidates with only some columns (an adaptive run) are completed round by round by
    # nuggets_jax.scoring.adaptive.rounds before an exact run; any left partial here are scored again in full.
    blocks = blocks_to_run(
        done_anywhere, scorer.widths, engine.buckets, engine.slots, scorer.deal_groups(engine.layout), engine.pair_flops
    )
    scorer.run(blocks, CHUNK_PREFIX, logp, correct, np.arange(n), engine.pair_flops, counted=done_anywhere)
    bar.close()
    logp, correct = sharding.merge_rows(logp, correct)
    return OneShotResult(logp, correct, scorer.stats, resumed)
