"""nuggets_jax scoring as the pool grows (pairs/s, peak RSS) and on 1 vs 8 fake CPU devices.

Every measurement runs in its own subprocess, so peak RSS (`ru_maxrss`) belongs to that run alone
and JAX_NUM_CPU_DEVICES can differ. Pool sizes are 1x, 4x and 16x (default 2, 8, 32 candidates,
nested samples of one seeded permutation) against the first `--num_tasks` tasks: pairs/s should
stay level and memory flat. On 2 cores, 8 fake devices share the same 2 cores, so the expected
result is equal total work (pairs/s about the same as 1 device), not a speed-up; the scores of the
two runs are compared as well. A call holds C = devices x candidates_per_device candidates of one
prefix bucket and computes every slot, so a small sample leaves slots empty on 8 devices: "slot
fill" says how many, and "slot pairs/s" counts the empty slots as work (the fair comparison).

    python -m benchmarks.bench_scaling --out scaling.json
    python -m benchmarks.bench_scaling --sizes 1 2 --device_candidates 2 --num_tasks 5   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common

_RESULT = "RESULT "


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--pool", default=str(common.DEFAULT_POOL))
    parser.add_argument("--tasks", default=str(common.DEFAULT_TASKS))
    parser.add_argument("--preset", default="original")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32], help="candidates per run (1x, 4x, 16x)")
    parser.add_argument("--num_tasks", type=int, default=25, help="first N tasks")
    parser.add_argument("--device_counts", type=int, nargs="+", default=[1, 8], help="fake CPU devices to compare")
    parser.add_argument("--device_candidates", type=int, default=8, help="candidates in each device-count run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--xla_flags", default=None)
    parser.add_argument("--out", default=None)
    # Internal: one measurement (what the parent starts in a subprocess).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num_candidates", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scores_out", default=None, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def _worker(args: argparse.Namespace, engine_args: list[str]) -> dict[str, Any]:
    """One run: load, warm up with one candidate, score `num_candidates`, report speed and memory."""
    common.set_xla_flags(args.xla_flags)
    import jax

    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
    from benchmarks.bench_scoring import _engine_config
    from nuggets_jax.models import load_model
    from nuggets_jax.scoring import blocks, one_shot
    from nuggets_jax.scoring import engine as scoring
    from nuggets_jax.store import ScoreStore

    engine_config, _ = _engine_config(engine_args)
    loaded = load_model(args.model, "float32")
    inputs = common.load_inputs(
        loaded.tokenizer, args.pool, args.tasks, args.num_candidates, args.seed, args.num_tasks, args.preset
    )
    tasks, prefixes = inputs.tokenized_tasks, inputs.prefixes
    rss_loaded = common.current_rss_bytes()

    def log(message: str) -> None:
        print(f"[worker {args.num_candidates}c/{jax.device_count()}d] {message}", file=sys.stderr, flush=True)

    engine = scoring.Engine(loaded.model, tasks, scoring.prefix_lengths_of(prefixes), engine_config, log=log)
    compiles = common.CompileCounter()
    ids = [r.id for r in inputs.candidates]
    task_ids = [r.id for r in inputs.tasks]
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as workdir:
        zero_logp, _, _ = engine.zero_shot(prefixes.zero_shot)
        one_shot.run_one_shot(
            engine,
            common.subset_prefixes(prefixes, [0]),
            ScoreStore(pathlib.Path(workdir) / "warm"),
            ids[:1],
            task_ids,
            progress=False,
            log=log,
        )
        rss_warm = common.current_rss_bytes()
        peak_warm = common.peak_rss_bytes()
        with compiles:
            result = one_shot.run_one_shot(
                engine, prefixes, ScoreStore(pathlib.Path(workdir) / "run"), ids, task_ids, progress=False, log=log
            )
    rss_end = common.current_rss_bytes()
    if args.scores_out:
        np.savez(args.scores_out, one_logp=result.one_logp, one_correct=result.one_correct, zero_logp=zero_logp)
    flops = sum(engine.pair_flops(len(p)) for p in prefixes.ids)
    # Every slot of a call is computed, filled or not: count the candidate slots the pass's own
    # block plan computes (a dealt block: its calls x C slot-rows, over the groups per candidate).
    widths = np.asarray([engine.bucket_width(len(p)) for p in prefixes.ids])
    plan = blocks.blocks_to_run(
        np.zeros(len(widths), bool), widths, engine.buckets, engine.slots, engine.deal_groups, engine.pair_flops
    )
    groups = len(engine.layout.groups)
    computed_slots = sum(engine.calls_per_block(blocks.dealt_candidates(b)) for b in plan) * engine.slots / groups
    seconds = result.stats.wall_s
    return {
        "candidates": len(ids),
        "tasks": len(task_ids),
        "devices": jax.device_count(),
        "pairs": result.stats.pairs,
        "seconds": seconds,
        "pairs_per_s": result.stats.pairs / seconds,
        "task_tokens_per_s": len(ids) * sum(len(t) for t in tasks.ids) / seconds,
        "useful_flops_per_s": flops / seconds,
        "compiles_after_warmup": compiles.count,
        "rss_after_load_bytes": rss_loaded,
        "rss_after_warmup_bytes": rss_warm,
        "rss_end_bytes": rss_end,
        "peak_rss_after_warmup_bytes": peak_warm,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "candidates_per_call": engine.slots,
        "computed_candidate_slots": computed_slots,
        "slot_fill": len(ids) / computed_slots,
        "prefix_buckets": list(engine.buckets),
    }


def _run_worker(
    args: argparse.Namespace, engine_args: list[str], candidates: int, devices: int, scores_out: str | None
) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "benchmarks.bench_scaling", "--worker",
        "--model", args.model, "--pool", args.pool, "--tasks", args.tasks, "--preset", args.preset,
        "--num_tasks", str(args.num_tasks), "--seed", str(args.seed), "--num_candidates", str(candidates),
        *(["--xla_flags", args.xla_flags] if args.xla_flags else []),
        *(["--scores_out", scores_out] if scores_out else []),
        *engine_args,
    ]  # fmt: skip
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices)}
    print(f"[bench_scaling] {candidates} candidates on {devices} device(s) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=common.REPO, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: the worker for {candidates} candidates on {devices} device(s) failed: {command}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if not lines:
        raise SystemExit(f"error: the worker printed no result: {command}")
    return {**json.loads(lines[-1][len(_RESULT) :]), "process_s": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every measurement in a subprocess; prints two tables and returns every number."""
    args, engine_args = _parse_args(argv)
    if args.worker:
        result = _worker(args, engine_args)
        print(_RESULT + json.dumps(result), flush=True)
        return result
    if any(a.startswith("--") and not a.startswith("--engine.") for a in engine_args):
        raise SystemExit(f"error: unrecognized arguments {engine_args} (see --help)")
    machine = common.machine_info()
    gib = 2**30

    scaling = [_run_worker(args, engine_args, n, 1, None) for n in args.sizes]
    base = scaling[0]
    rows = [
        [r["candidates"], r["pairs"], r["seconds"], r["pairs_per_s"], r["pairs_per_s"] / base["pairs_per_s"],
         r["peak_rss_bytes"] / gib, r["peak_rss_bytes"] / base["peak_rss_bytes"],
         (r["rss_end_bytes"] - r["rss_after_warmup_bytes"]) / 2**20, r["compiles_after_warmup"]]
        for r in scaling
    ]  # fmt: skip
    common.print_table(
        ["candidates", "pairs", "seconds", "pairs/s", "x smallest", "peak RSS GiB", "x smallest",
         "RSS growth while scoring MiB", "compiles"],
        rows,
        title=f"pool scaling: {args.num_tasks} tasks, 1 device, each size its own process",
    )  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench_scaling_scores_") as tmp:
        devices = []
        for count in args.device_counts:
            out = str(pathlib.Path(tmp) / f"devices_{count}.npz")
            devices.append({**_run_worker(args, engine_args, args.device_candidates, count, out), "scores": out})
        scores = [np.load(d.pop("scores")) for d in devices]
        diffs = [float(np.max(np.abs(s["one_logp"] - scores[0]["one_logp"]))) for s in scores]
        for d, diff, s in zip(devices, diffs, scores, strict=True):
            d["max_abs_diff_one_logp_vs_first"] = diff
            d["one_correct_mismatches_vs_first"] = int(np.sum(s["one_correct"] != scores[0]["one_correct"]))
    first = devices[0]
    common.print_table(
        ["devices", "candidates/call", "slot fill", "pairs", "seconds", "pairs/s", "x first",
         "slot pairs/s", "x first", "peak RSS GiB", "max |diff| one_logp", "compiles"],
        [
            [d["devices"], d["candidates_per_call"], d["slot_fill"], d["pairs"], d["seconds"], d["pairs_per_s"],
             d["pairs_per_s"] / first["pairs_per_s"], d["pairs_per_s"] / d["slot_fill"],
             d["pairs_per_s"] / d["slot_fill"] / (first["pairs_per_s"] / first["slot_fill"]),
             d["peak_rss_bytes"] / gib,
             d["max_abs_diff_one_logp_vs_first"], d["compiles_after_warmup"]]
            for d in devices
        ],
        title=f"fake CPU devices: {args.device_candidates} candidates x {args.num_tasks} tasks "
        f"(JAX_NUM_CPU_DEVICES; {machine['cpus_usable']} real cores: equal total work expected)",
    )  # fmt: skip
    output = {
        "machine": machine,
        "args": vars(args),
        "engine_args": engine_args,
        "scaling": scaling,
        "devices": devices,
        "ratios": {
            "pairs_per_s_largest_over_smallest": scaling[-1]["pairs_per_s"] / base["pairs_per_s"],
            "peak_rss_largest_over_smallest": scaling[-1]["peak_rss_bytes"] / base["peak_rss_bytes"],
            "pairs_per_s_last_devices_over_first": devices[-1]["pairs_per_s"] / first["pairs_per_s"],
            # The same with every computed candidate slot counted as work (empty slots included).
            "slot_pairs_per_s_last_devices_over_first": (devices[-1]["pairs_per_s"] / devices[-1]["slot_fill"])
            / (first["pairs_per_s"] / first["slot_fill"]),
            "peak_rss_last_devices_over_first": devices[-1]["peak_rss_bytes"] / first["peak_rss_bytes"],
        },
        "load_average_end": list(os.getloadavg()),
    }
    if args.out:
        common.write_json(args.out, output)
    return output


if __name__ == "__main__":
    main()
