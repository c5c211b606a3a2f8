"""nuggets_jax without prefix caching: every (candidate, task) pair run whole as one sequence.

The same Flax model, the same float32 numerics and the same LM-head-at-response-only trick as the
engine, but each pair is `prefix ++ task` from position 0 (the prefix is recomputed for every
task), pairs batched `rows` at a time into one fixed padded shape, compiled once. What it costs
over `nuggets_jax.scoring.engine` is what the prefix cache (and the packed, bucketed task rows) saves.

Run alone (bench_scoring runs it side by side with the engine):
    python -m benchmarks.no_cache --num_candidates 2 --num_tasks 10
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class NoCacheResult:
    """One-shot sums of the pairs scored, and what it took."""

    one_logp: np.ndarray  # [C, T] float32
    one_correct: np.ndarray  # [C, T] int32
    stats: dict[str, Any]


def _no_cache_program(graphdef, lm_chunk: int, state, tokens, mask, score_index, score_target, score_valid):
    """[B, L] whole sequences -> per-row sums over scored positions: logp [B] f32, correct [B] i32."""
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, state)
    h = model.hidden(tokens, mask)  # [B, L, D]
    h = jnp.take_along_axis(h, score_index[..., None], axis=1)  # [B, M, D]
    logp, correct = model.token_logprobs(h, score_target, lm_chunk=lm_chunk)  # [B, M]
    logp_sum = jnp.sum(jnp.where(score_valid, logp, 0.0), axis=-1)
    correct_sum = jnp.sum(score_valid & correct, axis=-1).astype(jnp.int32)
    return logp_sum, correct_sum


class NoCacheScorer:
    """One compiled program for [rows, length] pair sequences of a task set."""

    def __init__(
        self,
        model: Any,
        tasks: Any,
        max_prefix_tokens: int,
        rows: int = 16,
        length: int = 0,
        lm_head_tokens: int = 1024,
        log: Callable[[str], None] = print,
    ):
        """Fixes the padded shape and compiles the program.

        Args:
          model: a `nuggets_jax.models.llama.Llama`.
          tasks: `TokenizedTasks`.
          max_prefix_tokens: the longest prefix that will be scored (sets the padded length).
          rows: pair sequences per call.
          length: padded sequence length; 0 = the longest prefix + the longest task, rounded up to 64.
          lm_head_tokens: positions per LM-head chunk over the whole batch (bounds the [.., V] logits).
          log: progress messages.
        """
        import jax
        import jax.numpy as jnp
        from flax import nnx

        self.tasks = tasks
        self.rows = rows
        task_lengths = [len(t) for t in tasks.ids]
        needed = max_prefix_tokens + max(task_lengths)
        self.length = length or 64 * math.ceil(needed / 64)
        if self.length < needed:
            raise ValueError(f"--no_cache_length {self.length} is shorter than the longest pair ({needed} tokens)")
        self.scored = int(max(tasks.n_tokens))  # M: scored positions per pair, padded
        graphdef, state = nnx.split(model)
        self.state = state
        lm_chunk = max(8, lm_head_tokens // rows)
        start = time.perf_counter()
        seq = jax.ShapeDtypeStruct((rows, self.length), jnp.int32)
        seq_mask = jax.ShapeDtypeStruct((rows, self.length), jnp.bool_)
        scored = jax.ShapeDtypeStruct((rows, self.scored), jnp.int32)
        valid = jax.ShapeDtypeStruct((rows, self.scored), jnp.bool_)
        program = jax.jit(functools.partial(_no_cache_program, graphdef, lm_chunk))
        self._program = program.lower(state, seq, seq_mask, scored, scored, valid).compile()
        self.compile_s = time.perf_counter() - start
        log(f"no_cache: rows {rows}x{self.length}, {self.scored} scored positions, compiled in {self.compile_s:.1f}s")

    def _batches(self, prefixes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        """Host arrays of every pair, candidate-major, `rows` per batch; the last batch padded with empty rows."""
        tasks = self.tasks
        num_pairs = len(prefixes) * len(tasks.ids)
        num_rows = self.rows * math.ceil(num_pairs / self.rows)
        tokens = np.zeros((num_rows, self.length), np.int32)
        mask = np.zeros((num_rows, self.length), bool)
        score_index = np.zeros((num_rows, self.scored), np.int32)
        score_target = np.zeros((num_rows, self.scored), np.int32)
        score_valid = np.zeros((num_rows, self.scored), bool)
        pair = 0
        for prefix in prefixes:
            p = len(prefix)
            for ids, start in zip(tasks.ids, tasks.response_start, strict=True):
                n = len(ids)
                tokens[pair, :p] = prefix
                tokens[pair, p : p + n] = ids
                mask[pair, : p + n] = True
                # Position j predicts token j + 1: the response tokens are p + start .. p + n - 1.
                count = n - int(start)
                predicting = np.arange(p + int(start) - 1, p + n - 1)
                score_index[pair, :count] = predicting
                score_target[pair, :count] = tokens[pair, predicting + 1]
                score_valid[pair, :count] = True
                pair += 1
        arrays = (tokens, mask, score_index, score_target, score_valid)
        return [tuple(a[b : b + self.rows] for a in arrays) for b in range(0, num_rows, self.rows)]

    def warm_up(self) -> None:
        """Runs the program once on an all-padding batch (first-call costs out of the timed loop)."""
        import jax

        shapes = [(self.length, np.int32), (self.length, bool), (self.scored, np.int32), (self.scored, np.int32)]
        arrays = [np.zeros((self.rows, n), dtype) for n, dtype in shapes] + [np.zeros((self.rows, self.scored), bool)]
        jax.block_until_ready(self._program(self.state, *arrays))

    def score(self, prefixes: Sequence[np.ndarray]) -> NoCacheResult:
        """Scores every candidate against every task; pairs/s counts only the device loop.

        Args:
          prefixes: the candidates' prefix ids (each at most `max_prefix_tokens` long).

        Returns:
          one_logp / one_correct [C, T] and stats: wall_s, calls, pairs, pairs_per_s, task_tokens,
          sequence_tokens (prefix + task, real), slot_tokens (padded), fill.
        """
        import jax

        if max(len(p) for p in prefixes) + max(len(t) for t in self.tasks.ids) > self.length:
            raise ValueError("a prefix is longer than the max_prefix_tokens this scorer was compiled for")
        num_tasks = len(self.tasks.ids)
        num_pairs = len(prefixes) * num_tasks
        host_start = time.perf_counter()
        batches = self._batches(prefixes)
        host_s = time.perf_counter() - host_start
        start = time.perf_counter()
        logp_parts, correct_parts = [], []
        # Dispatch batch b + 1 before reading batch b back, so the host never idles the device.
        pending = self._program(self.state, *(jax.device_put(a) for a in batches[0]))
        for b in range(len(batches)):
            current = pending
            if b + 1 < len(batches):
                pending = self._program(self.state, *(jax.device_put(a) for a in batches[b + 1]))
            logp_parts.append(np.asarray(current[0]))
            correct_parts.append(np.asarray(current[1]))
        wall_s = time.perf_counter() - start
        logp = np.concatenate(logp_parts)[:num_pairs].reshape(len(prefixes), num_tasks)
        correct = np.concatenate(correct_parts)[:num_pairs].reshape(len(prefixes), num_tasks)
        task_tokens = len(prefixes) * sum(len(t) for t in self.tasks.ids)
        sequence_tokens = task_tokens + num_tasks * sum(len(p) for p in prefixes)
        slot_tokens = len(batches) * self.rows * self.length
        stats = {
            "wall_s": wall_s,
            "host_prepare_s": host_s,
            "calls": len(batches),
            "pairs": num_pairs,
            "pairs_per_s": num_pairs / wall_s,
            "task_tokens": task_tokens,
            "task_tokens_per_s": task_tokens / wall_s,
            "sequence_tokens": sequence_tokens,
            "slot_tokens": slot_tokens,
            "fill": sequence_tokens / slot_tokens,
        }
        return NoCacheResult(logp.astype(np.float32), correct.astype(np.int32), stats)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Standalone run: pairs/s of the no-cache scorer on a seeded sample."""
    from benchmarks import common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--pool", default=str(common.DEFAULT_POOL))
    parser.add_argument("--tasks", default=str(common.DEFAULT_TASKS))
    parser.add_argument("--num_candidates", type=int, default=2)
    parser.add_argument("--num_tasks", type=int, default=None, help="first N tasks only (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=16, help="pair sequences per call")
    parser.add_argument("--xla_flags", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    common.set_xla_flags(args.xla_flags)
    from nuggets_jax.models import load_model

    loaded = load_model(args.model, "float32")
    inputs = common.load_inputs(loaded.tokenizer, args.pool, args.tasks, args.num_candidates, args.seed, args.num_tasks)
    prefixes = inputs.prefixes.ids
    scorer = NoCacheScorer(
        loaded.model,
        inputs.tokenized_tasks,
        max(len(p) for p in prefixes),
        rows=args.rows,
        log=lambda m: print(m, file=sys.stderr),
    )
    scorer.warm_up()
    with common.CompileCounter() as compiles:
        result = scorer.score(prefixes)
    stats = {**result.stats, "compiles_after_warmup": compiles.count}
    common.print_table(
        ["pairs", "seconds", "pairs/s", "task tok/s", "fill", "compiles"],
        [
            [
                stats["pairs"],
                stats["wall_s"],
                stats["pairs_per_s"],
                stats["task_tokens_per_s"],
                stats["fill"],
                stats["compiles_after_warmup"],
            ]
        ],
        title="nuggets_jax without prefix caching",
    )
    output = {"machine": common.machine_info(), "inputs": inputs.summary(), "no_cache": stats}
    if args.out:
        common.write_json(args.out, output)
    return output


if __name__ == "__main__":
    main()
