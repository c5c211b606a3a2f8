"""The block loop shared by the exact pass and the adaptive rounds.

Candidates run through a compiled `scoring.Engine` in blocks of its C candidate slots, sorted by
prefix bucket so each block uses one program (`plan_blocks`). `BlockScorer.run` dispatches block
b + 1 before it reads block b back, checks the scores, counts the work and saves every
`chunk_candidates` candidates as one store chunk, so a killed run resumes where it stopped
(docs/ARCHITECTURE.md, "The store and resume"). With several processes each one keeps and saves the candidates
of its own slots; `sharding.merge_rows` combines them afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from nuggets_jax import sharding
from nuggets_jax.data import TokenizedPrefixes
from nuggets_jax.scoring.engine import Engine, PassStats, ScoringError, dealt_calls
from nuggets_jax.scoring.packing import TaskLayout
from nuggets_jax.store import ScoreStore


def check_finite(logp: np.ndarray, candidate_ids: Sequence[str], task_ids: Sequence[str]) -> None:
    """Raises ScoringError naming the first candidate/task whose log-prob sum is NaN or inf."""
    bad = ~np.isfinite(logp)
    if bad.any():
        c, t = np.argwhere(bad)[0]
        raise ScoringError(
            f"non-finite log-probability ({logp[c, t]}) for candidate {candidate_ids[c]!r} on task "
            f"{task_ids[t]!r} ({int(bad.sum())} pair(s) in this block). The model or its dtype is broken "
            "for this input (try model.dtype=float32); finished chunks are kept."
        )


def plan_blocks(
    candidates: Sequence[int],
    widths: np.ndarray,
    buckets: Sequence[int],
    slots: int,
    groups: int = 0,
    cost: Callable[[int], float] = float,
) -> list[np.ndarray]:
    """Blocks of `slots` candidate indices (-1 = empty slot), each block within one prefix bucket.

    `candidates` come sorted by (bucket, position). A bucket's leftover (fewer than `slots`) moves up
    into the next wider bucket rather than running with empty slots (its prefixes are masked there,
    so the scores do not change).

    With `groups` (row groups per candidate; 0 = never), a leftover of k candidates may instead run
    as a dealt block (`Engine.dispatch_dealt`: slot s holds leftover[s % k], the candidates' row
    groups dealt over the slots) at its own width, when that costs less than the next wider bucket;
    `cost(width)` is one candidate's work at a prefix width. The last leftover is then always dealt.
    Otherwise only the very last block can have empty slots.
    """
    blocks: list[np.ndarray] = []
    carry: list[int] = []
    present = {int(widths[i]) for i in candidates}
    for b, width in enumerate(buckets):
        members = carry + [i for i in candidates if widths[i] == width]
        full = len(members) - len(members) % slots
        blocks += [np.asarray(members[k : k + slots], np.int64) for k in range(0, full, slots)]
        carry = members[full:]
        if carry and groups:
            k = len(carry)
            wider = [w for w in buckets[b + 1 :] if w in present]
            dealt = dealt_calls(groups, slots, k) * slots / groups * cost(width)  # slot time, in candidates
            if not wider or dealt <= k * cost(wider[0]):
                blocks.append(np.asarray([carry[s % k] for s in range(slots)], np.int64))
                carry = []
    if carry:
        blocks.append(np.asarray(carry + [-1] * (slots - len(carry)), np.int64))
    return blocks


def blocks_to_run(
    done: np.ndarray,
    widths: np.ndarray,
    buckets: Sequence[int],
    slots: int,
    groups: int = 0,
    cost: Callable[[int], float] = float,
) -> list[np.ndarray]:
    """The blocks of an uninterrupted run (`plan_blocks` over the whole pool) not yet finished.

    A resumed run replays the original plan rather than planning the rest afresh: a candidate's
    block fixes its prefix width and neighbours, and with them the float rounding of its scores,
    so a resumed run is bit-identical to an uninterrupted one. A block some process saved only
    part of (a kill between two processes' saves) runs again whole.
    """
    order = [int(i) for i in np.lexsort((np.arange(len(widths)), widths))]
    return [b for b in plan_blocks(order, widths, buckets, slots, groups, cost) if not done[b[b >= 0]].all()]


def dealt_candidates(block: np.ndarray) -> np.ndarray | None:
    """The k candidates of a dealt block (slot s holds candidate s % k), or None for a block of
    one candidate per slot."""
    real = block[block >= 0]
    k = len(np.unique(real))
    return block[:k] if k < len(real) else None


def first_slots(block: np.ndarray) -> np.ndarray:
    """Per slot: it holds a candidate's result to keep (a real candidate, the first of its slots)."""
    seen: set[int] = set()
    keep = np.zeros(len(block), bool)
    for s, i in enumerate(block.tolist()):
        keep[s] = i >= 0 and i not in seen
        seen.add(i)
    return keep


def pipelined(engine: Engine, blocks: Sequence[np.ndarray], prefixes: TokenizedPrefixes, widths, layout=None):
    """Yields (block, (logp, correct)) for each block of candidate indices (-1 = empty slot).

    logp and correct have one row per local slot (a dealt candidate's row in each of its slots).
    Block b + 1 is dispatched before block b is read back, so the host works while the devices
    compute. Every process passes the global block's prefix width, so all of them run one program.
    """

    def dispatch(block):
        width = int(max(widths[i] for i in block if i >= 0))
        dealt = dealt_candidates(block)
        if dealt is not None:
            return dealt, engine.dispatch_dealt([prefixes.ids[i] for i in dealt], layout, width=width)
        mine = [prefixes.ids[i] if i >= 0 else None for i in block[engine.local]]
        return None, engine.dispatch_block(mine, layout, width=width)

    def collect(pending):
        dealt, calls = pending
        if dealt is None:
            return engine.collect_block(calls)
        logp, correct = engine.collect_dealt(calls, len(dealt), layout)
        rank = np.arange(engine.local.start, engine.local.stop) % len(dealt)
        return logp[rank], correct[rank]

    pending = dispatch(blocks[0]) if len(blocks) else None
    for b, block in enumerate(blocks):
        current = pending
        pending = dispatch(blocks[b + 1]) if b + 1 < len(blocks) else None
        yield block, collect(current)


def progress_bar(total: int, initial: int, progress: bool, desc: str):
    """A tqdm bar of scored pairs, shown by process 0 only."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="pair",
        desc=desc,
        disable=not progress or not sharding.is_main(),
        smoothing=0.05,
        dynamic_ncols=True,
    )


def next_chunk_seq(store: ScoreStore, prefix: str) -> int:
    """The sequence number of the next chunk named f"{prefix}{seq:06d}" in this process's store."""
    return 1 + max((int(name.split("-")[-1]) for name in store.names(prefix)), default=-1)


class BlockScorer:
    """Runs blocks of candidates through the engine and saves them chunk by chunk.

    One scorer serves a whole pass (the exact pass, or every round of an adaptive run): its
    `stats` and progress bar add up over every `run`.
    """

    def __init__(
        self,
        engine: Engine,
        prefixes: TokenizedPrefixes,
        store: ScoreStore,
        candidate_ids: Sequence[str],
        task_ids: Sequence[str],
        chunk_candidates: int,
        bar,
    ):
        self.engine, self.prefixes, self.store = engine, prefixes, store
        self.candidate_ids, self.task_ids = candidate_ids, task_ids
        self.blocks_per_chunk = max(1, chunk_candidates // engine.slots)
        self.bar = bar
        self.stats = PassStats()
        self.widths = np.asarray([engine.bucket_width(len(p)) for p in prefixes.ids])  # [N] prefix bucket width

    def deal_groups(self, layout: TaskLayout) -> int:
        """Row groups of `layout` a block leftover may deal over the slots (`plan_blocks`); 0 = never."""
        return len(layout.groups) if self.engine.deal_groups else 0

    def run(
        self,
        blocks: Sequence[np.ndarray],
        chunk_prefix: str,
        logp: np.ndarray,
        correct: np.ndarray,
        rows: np.ndarray,
        flops: Callable[[int], float],
        layout: TaskLayout | None = None,
        columns: np.ndarray | None = None,
        counted: np.ndarray | None = None,
    ) -> None:
        """Scores `blocks` and saves this process's candidates as chunks f"{chunk_prefix}{seq:06d}".

        Args:
          blocks: candidate indices per block (-1 = empty slot), from `plan_blocks`.
          chunk_prefix: the chunk names' prefix; numbering goes on after the stored chunks.
          logp, correct: [n, k] filled in with this process's candidates (row `rows[candidate]`).
          rows: [N] row in `logp` of each candidate of the blocks.
          flops: model FLOPs of one candidate from its prefix length (PassStats.flops).
          layout: the tasks to run (default: every task, `engine.layout`).
          columns: [k] task columns kept and saved with each chunk as "columns"; None = every task
            (exact chunks, which hold whole rows and no "columns").
          counted: [N] candidates the progress bar already counts (a block rerun whole).
        """
        engine, store = self.engine, self.store
        layout = layout or engine.layout
        task_ids = self.task_ids if columns is None else [self.task_ids[c] for c in columns]
        num_columns = len(task_ids)
        seq = next_chunk_seq(store, chunk_prefix)
        t0 = time.perf_counter()
        chunk_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for b, (block, (block_logp, block_correct)) in enumerate(
            pipelined(engine, blocks, self.prefixes, self.widths, layout)
        ):
            keep = first_slots(block)
            real = keep[engine.local]
            mine = block[engine.local][real]
            block_logp, block_correct = block_logp[real], block_correct[real]  # [n, T]
            if columns is not None:
                block_logp, block_correct = block_logp[:, columns], block_correct[:, columns]  # [n, k]
            check_finite(block_logp, [self.candidate_ids[i] for i in mine], task_ids)
            chunk_rows.append((mine, block_logp, block_correct))
            logp[rows[mine]], correct[rows[mine]] = block_logp, block_correct
            kept = block[keep]  # every process's candidates of the block
            self._count(block, kept, layout, num_columns, flops)
            fresh = len(kept) if counted is None else int((~counted[kept]).sum())
            self.bar.update(fresh * num_columns)
            if (b + 1) % self.blocks_per_chunk == 0 or b + 1 == len(blocks):
                arrays = {"candidates": np.concatenate([r[0] for r in chunk_rows]).astype(np.int64)}
                if columns is not None:
                    arrays["columns"] = np.asarray(columns, np.int64)
                arrays["one_logp"] = np.concatenate([r[1] for r in chunk_rows])
                arrays["one_correct"] = np.concatenate([r[2] for r in chunk_rows])
                store.write(f"{chunk_prefix}{seq:06d}", **arrays)
                seq += 1
                chunk_rows = []
        self.stats.wall_s += time.perf_counter() - t0

    def _count(self, block, kept, layout: TaskLayout, num_columns: int, flops: Callable[[int], float]) -> None:
        stats = self.stats
        stats.calls += 1 + self.engine.calls_per_block(dealt_candidates(block), layout)
        stats.candidates += len(kept)
        stats.pairs += len(kept) * num_columns
        stats.task_tokens += len(kept) * layout.real_tokens
        stats.scored_tokens += len(kept) * layout.scored_tokens
        stats.flops += sum(flops(len(self.prefixes.ids[i])) for i in kept)
