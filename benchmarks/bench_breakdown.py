"""Where one block's time goes: the real step program with parts of the model taken out.

One candidate of the benchmark sample against every task, through the default `Engine`, timed
four ways in one process (best of `--repeats` blocks each, after a warm-up block; with several
devices the candidate fills every slot and the time is per candidate):

- `full`: the program the one-shot pass runs;
- `no attention`: the attention (task windows over the prefix and the row: gathers, scores,
  softmax) replaced by passing the queries through (the Q/K/V and output projections, norms and
  MLP stay);
- `no LM head`: log-probs replaced by a sum over the hidden state (no vocabulary matmul, no
  softmax);
- `neither`: both taken out: the body's matmuls and element-wise work only.

The differences are what attention and the LM head cost as implemented; `body matmul share` is the
FLOPs of the body matmuls on every computed token position (padding included) over the `neither` time,
as a fraction of the matmul peak measured in the same run. The scores of the ablated programs are
meaningless; only their time is used.

    python -m benchmarks.bench_breakdown --out benchmarks/results/breakdown.json
    python -m benchmarks.bench_breakdown --cpu_devices 1 --engine.lm_head_vocab_tile 100000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M), a HF dir or a .gguf file")
    parser.add_argument("--pool", default=str(common.DEFAULT_POOL))
    parser.add_argument("--tasks", default=str(common.DEFAULT_TASKS))
    parser.add_argument("--candidate", type=int, default=1, help="which candidate of the seed-0 sample of 8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--cpu_devices", type=int, default=common.usable_cores(), help="XLA:CPU devices (default: one per usable core)"
    )
    parser.add_argument("--out", default=None)
    return parser.parse_known_args(argv)


def _time_block(engine: Any, prefix: Any, repeats: int) -> float:
    """Seconds per candidate: the candidate in every slot of a block (one per device), best of `repeats`."""
    block = [prefix] * engine.slots
    engine.collect_block(engine.dispatch_block(block))  # warm-up (compiled ahead of time already)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.collect_block(engine.dispatch_block(block))
        best = min(best, time.perf_counter() - t0)
    return best / engine.slots


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, rest = _parse_args(argv)
    common.set_cpu_devices(args.cpu_devices)
    from benchmarks.bench_scoring import _engine_config, _engine_facts
    from nuggets_jax.models import attention as kernels
    from nuggets_jax.models import llama, load_model
    from nuggets_jax.scoring import engine as scoring

    engine_config, _ = _engine_config(rest)
    loaded = load_model(args.model, "float32")
    inputs = common.load_inputs(loaded.tokenizer, args.pool, args.tasks, 8, 0, None, "original")
    prefix = inputs.prefixes.ids[args.candidate]
    lengths = scoring.prefix_lengths_of(inputs.prefixes)
    peak = common.matmul_peak()["flops_per_s"]

    real_attention, real_logprobs = kernels.task_window_attention, llama.Llama.token_logprobs

    def no_attention(q, k, v, windows, causal, prefix):
        return q + 0 * (k.sum() + v.sum())  # keep K/V live so their projections still run

    def no_lm_head(self, h, targets, lm_chunk=512, lm_head_vocab_tile=0):
        s = h.sum(-1)
        return s, s > 0

    variants = {
        "full": (real_attention, real_logprobs),
        "no attention": (no_attention, real_logprobs),
        "no LM head": (real_attention, no_lm_head),
        "neither": (no_attention, no_lm_head),
    }
    seconds, facts = {}, {}
    try:
        for name, (attention, logprobs) in variants.items():
            kernels.task_window_attention, llama.Llama.token_logprobs = attention, logprobs
            engine = scoring.Engine(loaded.model, inputs.tokenized_tasks, lengths, engine_config, log=lambda m: None)
            seconds[name] = _time_block(engine, prefix, args.repeats)
            facts = _engine_facts(engine)
            print(f"[breakdown] {name}: {seconds[name]:.2f} s", file=sys.stderr, flush=True)
    finally:
        kernels.task_window_attention, llama.Llama.token_logprobs = real_attention, real_logprobs

    cfg = loaded.model.config
    body_flops = facts["slot_tokens_per_candidate"] * cfg.flops_per_token(lm_head=False)
    useful = engine.pair_flops(len(prefix))
    rows = [
        ["full", seconds["full"], 1.0, useful / seconds["full"] / peak],
        ["attention, prefix + row (full - no attention)", seconds["full"] - seconds["no attention"], None, ""],
        ["LM head (full - no LM head)", seconds["full"] - seconds["no LM head"], None, ""],
        ["body only (neither)", seconds["neither"], None, body_flops / seconds["neither"] / peak],
    ]
    for row in rows[1:]:
        row[2] = row[1] / seconds["full"]
    common.print_table(
        ["part", "seconds per block", "share of full", "FLOP/s / peak"],
        rows,
        title=f"one candidate ({len(prefix)} prefix tokens) x {len(inputs.tasks)} tasks; peak {peak / 1e9:.0f} GFLOP/s",
    )
    result = {
        "machine": common.machine_info(),
        "args": vars(args),
        "engine": facts,
        "prefix_tokens": len(prefix),
        "seconds": seconds,
        "peak_flops_per_s": peak,
        "useful_flops": useful,
        "useful_fraction_of_peak": useful / seconds["full"] / peak,
        "body_slot_flops": body_flops,
        "body_fraction_of_peak": body_flops / seconds["neither"] / peak,
    }
    if args.out:
        common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
