"""The one-shot pass over a pool: every candidate not yet in the store against every task.

Candidates run through a compiled `scoring.Engine` in blocks of its C slots, sorted by prefix
bucket so each block uses one program; finished blocks are saved to the store chunk by chunk, so
a killed run resumes where it stopped. With several processes each one scores and saves its own
slots, and the rows are merged on every process at the end.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from nuggets_jax.data import TokenizedPrefixes
from nuggets_jax.scoring.engine import Engine, PassStats, ScoringError, dealt_calls


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


@dataclasses.dataclass
class OneShotResult:
    one_logp: np.ndarray  # [N, T] float32
    one_correct: np.ndarray  # [N, T] int32
    stats: PassStats
    resumed_candidates: int  # candidates found done in the store


def run_one_shot(
    engine: Engine,
    prefixes: TokenizedPrefixes,
    store,
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
    from tqdm.auto import tqdm

    n, t = len(prefixes.ids), engine.num_tasks
    logp = np.full((n, t), np.nan, np.float32)
    correct = np.zeros((n, t), np.int32)
    chunk_names = [name for name in store.names() if name != "zero"]
    for name in chunk_names:
        # Exact chunks hold whole rows; other modes (adaptive rounds) add a "columns" array.
        chunk = store.read(name)
        idx = chunk["candidates"]
        cols = chunk["columns"] if "columns" in chunk else np.arange(t)
        logp[np.ix_(idx, cols)] = chunk["one_logp"]
        correct[np.ix_(idx, cols)] = chunk["one_correct"]
    done = ~np.isnan(logp).any(axis=1)
    resumed = int(done.sum())
    if resumed:
        log(f"resuming: {resumed} of {n} candidates already scored ({len(chunk_names)} chunk(s) in {store.dir})")
    done_anywhere = _any_process(done)
    lengths = np.asarray([len(p) for p in prefixes.ids])
    widths = np.asarray([engine.bucket_width(int(x)) for x in lengths])
    # Candidates with only some columns (an adaptive run) are completed round by round by
    # nuggets_jax.scoring.adaptive.rounds before an exact run; any left partial here are scored again in full.
    blocks = blocks_to_run(done_anywhere, widths, engine.buckets, engine.slots, engine.deal_groups, engine.pair_flops)
    blocks_per_chunk = max(1, chunk_candidates // engine.slots)
    next_seq = 1 + max((int(name.split("-")[1]) for name in chunk_names if name.startswith("one-")), default=-1)
    stats = PassStats()
    bar = tqdm(
        total=n * t,
        initial=int(done_anywhere.sum()) * t,
        unit="pair",
        desc="one-shot",
        disable=not progress or jax.process_index() != 0,
        smoothing=0.05,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()

    chunk_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for b, (block, (block_logp, block_correct)) in enumerate(pipelined(engine, blocks, prefixes, widths)):
        keep = first_slots(block)
        mine, real = block[engine.local], keep[engine.local]
        check_finite(block_logp[real], [candidate_ids[i] for i in mine[real]], task_ids)
        chunk_rows.append((mine[real], block_logp[real], block_correct[real]))
        logp[mine[real]], correct[mine[real]] = block_logp[real], block_correct[real]
        real_global = block[keep]
        stats.calls += 1 + engine.calls_per_block(dealt_candidates(block))
        stats.candidates += len(real_global)
        stats.pairs += len(real_global) * t
        stats.task_tokens += len(real_global) * engine.layout.real_tokens
        stats.scored_tokens += len(real_global) * engine.layout.scored_tokens
        stats.flops += sum(engine.pair_flops(int(lengths[i])) for i in real_global)
        bar.update(int((~done_anywhere[real_global]).sum()) * t)
        if (b + 1) % blocks_per_chunk == 0 or b + 1 == len(blocks):
            idx = np.concatenate([r[0] for r in chunk_rows]).astype(np.int64)
            store.write(
                f"one-{next_seq:06d}",
                candidates=idx,
                one_logp=np.concatenate([r[1] for r in chunk_rows]),
                one_correct=np.concatenate([r[2] for r in chunk_rows]),
            )
            next_seq += 1
            chunk_rows = []
    bar.close()
    stats.wall_s = time.perf_counter() - t0
    logp, correct = _merge_processes(logp, correct)
    return OneShotResult(logp, correct, stats, resumed)


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


def _any_process(flags: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(flags)).any(axis=0)


def _merge_processes(logp: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every process holds the rows it scored (NaN elsewhere); combine them on all processes."""
    if jax.process_count() == 1:
        return logp, correct
    from jax.experimental import multihost_utils

    all_logp = np.asarray(multihost_utils.process_allgather(logp))  # [P, N, T]
    all_correct = np.asarray(multihost_utils.process_allgather(correct))
    have = ~np.isnan(all_logp).all(axis=2)  # [P, N]
    owner = np.argmax(have, axis=0)
    rows = np.arange(logp.shape[0])
    return all_logp[owner, rows], all_correct[owner, rows]
