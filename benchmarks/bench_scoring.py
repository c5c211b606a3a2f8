"""One-shot scoring speed, side by side in one run: nuggets_jax, the original algorithm in PyTorch,
nuggets_jax without prefix caching, and the machine's float32 matmul peak.

Same machine, model (default SmolLM2-135M, float32) and data (a seeded sample of candidates from
the pool against the task set, `original` preset). The candidates are split into `--rounds`
groups and the systems take turns on each group (the order rotates every round), so a change of
load on the shared machine hits every system alike. The matmul peak is measured before the
scoring, before every nuggets_jax round and after the scoring; the largest value is the peak (the
machine's speed moves during a run, and the best measurement is the strictest yardstick). The
fraction of the best matmul either library reached (jax or torch) is printed too.

Useful FLOPs = model FLOPs of the tokens actually scored (`Engine.pair_flops`: each prefix once per
candidate, every task's real tokens through the body, the LM head only on response tokens,
attention over real keys); the same count divides every system's time, so "% of peak" compares
useful work, padding and recomputation excluded.

Workloads (`--workload`; `--pool`, `--tasks`, `--num_candidates`, `--max_task_tokens` override a
workload's values; all under the `original` preset so the PyTorch baseline runs the same tokens):

- `paper` (default): 8 candidates of the paper's low-score pool `nuggets/alpaca_gpt4_bad.json` x the
  paper's 100 tasks `nuggets/alpaca_gpt4_kmeans_100.json`, tasks cut at 200 tokens.
- `default`: 32 candidates of the main job's generated default pool (`nuggets_jax.synthetic`, read
  by the job's own loader) x all its 16 generated tasks. The main job scores them under the
  `default` preset (a separator and special tokens: a few tokens more per pair); this workload
  keeps `original` so the baseline, which implements only that preset, runs the same sequences.
- `short`: 64 candidates of the public Stanford Alpaca pool (`alpagasus/random_9k.json`: a random
  9,229-record sample of the original Alpaca-52k, text-davinci-003 outputs; its 4 records with an
  empty output left out) x the paper's 100 tasks cut at 64 tokens (the baseline pads to 64 too).
- `all`: the three in turn in one process (the model loaded once), then one combined table.

The record files live in ../shared/data (their sources in ../shared/data/SOURCES.md).

    python -m benchmarks.bench_scoring --num_candidates 8 --out results.json
    python -m benchmarks.bench_scoring --workload all --out results.json
    python -m benchmarks.bench_scoring --workload short --num_candidates 4 --skip_no_cache --rounds 1
    python -m benchmarks.bench_scoring --num_candidates 1 --num_tasks 5          # smoke test
    python -m benchmarks.bench_scoring --engine.candidates_per_device 2 --skip_torch --skip_no_cache
    python -m benchmarks.bench_scoring --xla_flags=--xla_cpu_use_onednn=true --skip_torch

Any `--engine.NAME VALUE` is passed to `nuggets_jax.scoring.engine.EngineConfig(NAME=VALUE)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks import common

TARGET_SPEEDUP = 2.0  # pairs/s over the PyTorch baseline, on every workload
TARGET_PEAK_FRACTION = 0.80  # useful FLOP/s over the same run's matmul peak, on every workload


@dataclasses.dataclass(frozen=True)
class Workload:
    """A named benchmark input: a sample of a pool against a task set.

    Attributes:
      name: the `--workload` value.
      pool / tasks: record files, or `common.GENERATED` for the main job's generated data.
      num_candidates: candidates sampled from the pool (seeded).
      max_task_tokens: the task cut over the preset's; None = the preset's (200 for `original`).
      skip_empty_outputs: leave out pool records with an empty output (the public Alpaca sample has 4).
      about: one line for the report.
    """

    name: str
    pool: str
    tasks: str
    num_candidates: int
    max_task_tokens: int | None = None
    skip_empty_outputs: bool = False
    about: str = ""


WORKLOADS = {
    "paper": Workload(
        "paper",
        str(common.DEFAULT_POOL),
        str(common.DEFAULT_TASKS),
        8,
        about="the paper's low-score Alpaca-GPT4 pool x its 100 k-means tasks, cut at 200",
    ),
    "default": Workload(
        "default",
        common.GENERATED,
        common.GENERATED,
        32,
        about="the main job's generated default pool x its 16 generated tasks (original preset)",
    ),
    "short": Workload(
        "short",
        str(common.ALPACA_POOL),
        str(common.DEFAULT_TASKS),
        64,
        max_task_tokens=64,
        skip_empty_outputs=True,
        about="public Alpaca pool (alpagasus random_9k) x the paper's 100 tasks cut at 64",
    ),
}


def _per_workload(text: str) -> dict[str, int]:
    """ "16" (every workload) or "paper=8,short=16" -> {workload: count}."""
    try:
        if "=" not in text:
            return dict.fromkeys(WORKLOADS, int(text))
        counts = {name.strip(): int(count) for name, count in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want a count or NAME=COUNT,... (e.g. paper=8,short=16)") from None
    unknown = sorted(set(counts) - set(WORKLOADS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    return counts


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M), a HF dir or a .gguf file")
    parser.add_argument("--workload", default="paper", choices=[*WORKLOADS, "all"], help="named inputs (see above)")
    parser.add_argument(
        "--pool",
        default=None,
        help="candidate records (.json / .jsonl, 'default' = generated); default: the workload's",
    )
    parser.add_argument(
        "--tasks", default=None, help="task records (.json / .jsonl, 'default' = generated); default: the workload's"
    )
    parser.add_argument("--preset", default="original")
    parser.add_argument(
        "--num_candidates",
        type=_per_workload,
        default=None,
        help="one count for every workload, or per workload: 'paper=8,short=16'; default: the workload's",
    )
    parser.add_argument("--max_task_tokens", type=int, default=None, help="task cut; default: the workload's")
    parser.add_argument("--num_tasks", type=int, default=None, help="first N tasks only (smoke runs; default all)")
    parser.add_argument("--seed", type=int, default=0, help="candidate sampling seed")
    parser.add_argument("--rounds", type=int, default=2, help="candidate groups the systems take turns on")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--skip_no_cache", action="store_true")
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--torch_attn", default=None, help="eager | sdpa (default: torch_baseline's default)")
    parser.add_argument("--torch_task_batch", type=int, default=16)
    parser.add_argument("--no_cache_rows", type=int, default=16, help="pair sequences per no-cache call")
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument("--matmul_repeats", type=int, default=10)
    parser.add_argument("--xla_flags", default=None, help="appended to XLA_FLAGS before jax is imported")
    parser.add_argument(
        "--cpu_devices", type=int, default=common.usable_cores(), help="XLA:CPU devices (default: one per usable core)"
    )
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    parser.add_argument("--out", default=None, help="write every number here as JSON")
    args, rest = parser.parse_known_args(argv)
    return args, rest


def _engine_config(rest: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """EngineConfig from `--engine.NAME VALUE` / `--engine.NAME=VALUE` (types from the field defaults)."""
    from nuggets_jax.scoring.engine import EngineConfig

    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    defaults = EngineConfig()
    overrides: dict[str, Any] = {}
    items = list(rest)
    while items:
        item = items.pop(0)
        if not item.startswith("--engine."):
            raise SystemExit(f"error: unrecognized argument {item!r} (see --help)")
        name, _, value = item[len("--engine.") :].partition("=")
        if not value:
            if not items:
                raise SystemExit(f"error: {item} needs a value")
            value = items.pop(0)
        if name not in fields:
            raise SystemExit(f"error: --engine.{name}: EngineConfig has no field {name!r}; fields: {', '.join(fields)}")
        kind = type(getattr(defaults, name))
        if kind is bool:
            overrides[name] = value.lower() in ("1", "true", "yes")
        else:
            try:
                overrides[name] = kind(value)
            except ValueError:
                raise SystemExit(f"error: --engine.{name}={value!r} is not a {kind.__name__}") from None
    return dataclasses.replace(defaults, **overrides), overrides


def _engine_facts(engine: Any) -> dict[str, Any]:
    """What the engine chose (shapes, buckets, programs); tolerant of attributes that come and go."""
    facts: dict[str, Any] = {}
    for key, get in {
        "devices": lambda: int(engine.mesh.devices.size),
        "candidates_per_call": lambda: engine.slots,
        "row_length": lambda: engine.row_length,
        "rows_per_group": lambda: engine.rows_per_group,
        "groups": lambda: len(engine.layout.groups),
        "fill": lambda: engine.layout.fill,
        "task_windows": lambda: [list(w.shape) for w in engine.layout.groups[0].window_index],
        "slot_tokens_per_candidate": lambda: engine.layout.padded_tokens,
        "prefix_buckets": lambda: list(engine.buckets),
        "programs": lambda: engine.programs,
        "compile_s": lambda: engine.compile_s,
    }.items():
        with contextlib.suppress(AttributeError):
            facts[key] = get()
    return facts


def _per_token_diff(a: np.ndarray, b: np.ndarray, n_tokens: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b) / n_tokens))


def resolve_workloads(args: argparse.Namespace) -> list[Workload]:
    """The workloads to run (`--workload`, `all` = every one), explicit flags over their values.

    Raises:
      SystemExit: naming the file and what to do when a workload's record file is absent.
    """
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    counts = args.num_candidates or {}
    workloads = []
    for name in names:
        flags = {"pool": args.pool, "tasks": args.tasks, "num_candidates": counts.get(name)}
        workload = dataclasses.replace(WORKLOADS[name], **{k: v for k, v in flags.items() if v is not None})
        if args.max_task_tokens is not None:
            workload = dataclasses.replace(workload, max_task_tokens=args.max_task_tokens)
        for role in ("pool", "tasks"):
            spec = getattr(workload, role)
            path = pathlib.Path(spec).expanduser()
            if spec == common.GENERATED or path.exists():
                continue
            public = path.resolve().is_relative_to(common.SHARED_DATA.resolve())
            where = (
                f"it is a public file expected under {common.SHARED_DATA} (sources: {common.SHARED_DATA}/SOURCES.md); "
                "put the shared data folder next to the repository, or "
                if public
                else ""
            )
            raise SystemExit(
                f"error: {path}: the {name!r} workload's {role} file is not there; {where}pass --{role} PATH "
                "(a .json / .jsonl record file), or run --workload default (generated data, no files)."
            )
        workloads.append(workload)
    return workloads


@dataclasses.dataclass
class _Session:
    """What every workload of one run shares: the model, the engine config, the machine, the counter."""

    args: argparse.Namespace
    loaded: Any
    engine_config: Any
    engine_overrides: dict[str, Any]
    machine: dict[str, Any]
    compiles: common.CompileCounter
    torch_model: Any
    log: Callable[[str], None]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the comparison, prints tables, returns (and with --out writes) every number.

    One workload returns its numbers as one dict; `--workload all` returns
    {"workloads": {name: that dict}, "summary": one row per workload and system, ...}.
    """
    args, rest = _parse_args(argv)
    common.set_xla_flags(args.xla_flags)
    import jax

    common.set_cpu_devices(args.cpu_devices)

    from nuggets_jax.models import load_model

    engine_config, engine_overrides = _engine_config(rest)
    if args.preset != "original" and not args.skip_torch:
        raise SystemExit("error: the PyTorch baseline implements the original preset only; add --skip_torch")
    workloads = resolve_workloads(args)
    machine = common.machine_info()

    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    loaded = load_model(args.model, "float32")
    torch_model = None
    if not args.skip_torch:
        import torch
        from transformers import AutoModelForCausalLM

        from benchmarks import torch_baseline

        torch.set_num_threads(args.torch_threads)
        attn = args.torch_attn or torch_baseline.DEFAULT_ATTN_IMPLEMENTATION
        torch_model = AutoModelForCausalLM.from_pretrained(
            str(loaded.model_dir), dtype=torch.float32, attn_implementation=attn
        ).eval()
    session = _Session(
        args, loaded, engine_config, engine_overrides, machine, common.CompileCounter(), torch_model, log
    )
    outputs = {workload.name: _run_workload(session, workload) for workload in workloads}
    if len(outputs) == 1:
        output = next(iter(outputs.values()))
    else:
        summary = _print_combined(outputs)
        output = {
            "machine": machine,
            "args": vars(args),
            "summary": summary,
            "workloads": outputs,
            "peak_rss_bytes": common.peak_rss_bytes(),
            "jax_devices": [str(d) for d in jax.devices()],
        }
    if args.out:
        common.write_json(args.out, output)
    return output


def _run_workload(session: _Session, workload: Workload) -> dict[str, Any]:
    """Warm-up, interleaved timed rounds and report of one workload; returns every number."""
    import jax

    from nuggets_jax.scoring import engine as scoring
    from nuggets_jax.scoring import one_shot as one_shot
    from nuggets_jax.store import ScoreStore

    args, loaded, log, compiles = session.args, session.loaded, session.log, session.compiles
    machine = session.machine
    if not args.skip_torch:
        from benchmarks import torch_baseline
    load_average_start = list(os.getloadavg())
    log(f"workload {workload.name}: {workload.about}")

    overrides = {"max_task_tokens": workload.max_task_tokens} if workload.max_task_tokens else None
    inputs = common.load_inputs(
        loaded.tokenizer,
        workload.pool,
        workload.tasks,
        workload.num_candidates,
        args.seed,
        args.num_tasks,
        args.preset,
        overrides,
        workload.skip_empty_outputs,
    )
    tasks, prefixes = inputs.tokenized_tasks, inputs.prefixes
    task_cut = inputs.policy.max_task_tokens  # what the PyTorch baseline pads every task to
    summary = inputs.summary()
    num_candidates, num_tasks = len(inputs.candidates), len(inputs.tasks)
    n_tokens = np.asarray(tasks.n_tokens, np.float64)  # [T]
    task_tokens_per_candidate = sum(len(t) for t in tasks.ids)
    candidate_ids = [r.id for r in inputs.candidates]
    task_ids = [r.id for r in inputs.tasks]
    if inputs.dropped:
        log(f"left out {len(inputs.dropped)} pool record(s) with an empty output: {', '.join(inputs.dropped)}")
    log(
        f"{num_candidates} candidates x {num_tasks} tasks ({args.preset}, cut at {task_cut}); task tokens mean "
        f"{summary['task_tokens_mean']:.1f}, prefix tokens mean {summary['prefix_tokens_mean']:.1f}"
    )

    peaks = {"before": common.matmul_peak(args.matmul_size, args.matmul_repeats)}
    log(f"matmul peak before: {peaks['before']['flops_per_s'] / 1e9:.1f} GFLOP/s")
    compiles.count, compiles.seconds = 0, 0.0

    # -- set up and warm up every system (nothing here is timed as throughput) ------------------
    engine = scoring.Engine(loaded.model, tasks, scoring.prefix_lengths_of(prefixes), session.engine_config, log=log)
    workdir = tempfile.TemporaryDirectory(prefix="bench_scoring_")
    warm_start = time.perf_counter()
    with compiles:
        engine.zero_shot(prefixes.zero_shot)
        one_shot.run_one_shot(
            engine,
            common.subset_prefixes(prefixes, [0]),
            ScoreStore(pathlib.Path(workdir.name) / "warm_up"),
            candidate_ids[:1],
            task_ids,
            progress=False,
            log=log,
        )
    warm_up = {"seconds": time.perf_counter() - warm_start, "compiles": compiles.count}
    compiles.count, compiles.seconds = 0, 0.0
    log(f"nuggets_jax warm-up (zero-shot + 1 candidate): {warm_up['seconds']:.1f}s, {warm_up['compiles']} compiles")

    no_cache = None
    if not args.skip_no_cache:
        from benchmarks.no_cache import NoCacheScorer

        no_cache = NoCacheScorer(
            loaded.model,
            tasks,
            max(len(p) for p in prefixes.ids),
            # No more rows than the smallest round has pairs: empty rows would be timed as work.
            rows=min(args.no_cache_rows, num_tasks * (num_candidates // max(1, min(args.rounds, num_candidates)))),
            lm_head_tokens=engine.config.lm_head_tokens,
            log=log,
        )
        no_cache.warm_up()
    torch_model, torch_peak = session.torch_model, None
    if not args.skip_torch:
        torch_peak = common.torch_matmul_peak(args.matmul_size, args.matmul_repeats, args.torch_threads)
        torch_baseline.score_original(
            torch_model,
            loaded.tokenizer,
            inputs.candidate_dicts[:1],
            inputs.task_dicts[: args.torch_task_batch],
            task_batch=args.torch_task_batch,
            max_task_tokens=task_cut,
            progress=False,
        )

    # -- the timed rounds --------------------------------------------------------------------------
    systems = ["nuggets_jax", *([] if args.skip_torch else ["torch"]), *([] if args.skip_no_cache else ["no_cache"])]
    groups = list(np.array_split(np.arange(num_candidates), max(1, min(args.rounds, num_candidates))))
    ours = {
        "one_logp": np.full((num_candidates, num_tasks), np.nan, np.float32),
        "one_correct": np.zeros((num_candidates, num_tasks), np.int32),
        "wall_s": 0.0,
        "engine_flops": 0.0,
    }
    ref = {
        "one_logp": np.full((num_candidates, num_tasks), np.nan, np.float32),
        "one_correct": np.zeros((num_candidates, num_tasks), np.int32),
        "one_s": 0.0,
        "zero_s": [],
    }
    plain = {
        "one_logp": np.full((num_candidates, num_tasks), np.nan, np.float32),
        "one_correct": np.zeros((num_candidates, num_tasks), np.int32),
        "wall_s": 0.0,
        "stats": [],
    }
    zero: dict[str, Any] = {}
    timeline = []
    t_origin = time.perf_counter()
    for r, members in enumerate(groups):
        members = [int(m) for m in members]
        shift = r % len(systems)
        for system in systems[shift:] + systems[:shift]:
            if system == "nuggets_jax":
                peaks.setdefault("rounds", []).append(common.matmul_peak(args.matmul_size, args.matmul_repeats))
            start, cpu_start = time.perf_counter(), common.cpu_seconds()
            if system == "nuggets_jax":
                with compiles:
                    if not zero:
                        zero_logp, zero_correct, zero_stats = engine.zero_shot(prefixes.zero_shot)
                        zero = {
                            "logp": zero_logp,
                            "correct": zero_correct,
                            "wall_s": zero_stats.wall_s,
                            "flops": engine.pair_flops(len(prefixes.zero_shot)),
                        }
                    result = one_shot.run_one_shot(
                        engine,
                        common.subset_prefixes(prefixes, members),
                        ScoreStore(pathlib.Path(workdir.name) / f"round_{r}"),
                        [candidate_ids[m] for m in members],
                        task_ids,
                        progress=args.progress,
                        log=log,
                    )
                ours["one_logp"][members], ours["one_correct"][members] = result.one_logp, result.one_correct
                ours["wall_s"] += result.stats.wall_s
                ours["engine_flops"] += result.stats.flops
                seconds = result.stats.wall_s
            elif system == "torch":
                out = torch_baseline.score_original(
                    torch_model,
                    loaded.tokenizer,
                    [inputs.candidate_dicts[m] for m in members],
                    inputs.task_dicts,
                    task_batch=args.torch_task_batch,
                    max_task_tokens=task_cut,
                    progress=args.progress,
                )
                ref["one_logp"][members], ref["one_correct"][members] = out["one_logp"], out["one_correct"]
                ref["one_s"] += out["timings"]["one_s"]
                ref["zero_s"].append(out["timings"]["zero_s"])
                ref.setdefault("zero_logp", out["zero_logp"])
                ref.setdefault("zero_correct", out["zero_correct"])
                ref.setdefault("n_tokens", out["n_tokens"])
                seconds = out["timings"]["one_s"]
            else:
                with compiles:
                    out = no_cache.score([prefixes.ids[m] for m in members])
                plain["one_logp"][members], plain["one_correct"][members] = out.one_logp, out.one_correct
                plain["wall_s"] += out.stats["wall_s"]
                plain["stats"].append(out.stats)
                seconds = out.stats["wall_s"]
            timeline.append(
                {
                    "round": r,
                    "system": system,
                    "candidates": len(members),
                    "start_s": start - t_origin,
                    "scoring_s": seconds,
                    "total_s": time.perf_counter() - start,
                    "cpu_s": common.cpu_seconds() - cpu_start,
                }
            )
            log(f"round {r} {system}: {len(members)} candidate(s) in {seconds:.1f}s")
    peaks["after"] = common.matmul_peak(args.matmul_size, args.matmul_repeats)
    jax_peaks = [peaks["before"], *peaks.get("rounds", []), peaks["after"]]
    peak = max(m["flops_per_s"] for m in jax_peaks)
    best_any = max(peak, torch_peak["flops_per_s"] if torch_peak else 0.0)
    log(f"matmul peak after: {peaks['after']['flops_per_s'] / 1e9:.1f} GFLOP/s")

    # -- numbers -----------------------------------------------------------------------------------
    pairs = num_candidates * num_tasks
    useful_flops = sum(engine.pair_flops(len(p)) for p in prefixes.ids)
    model_config = loaded.config

    def rates(seconds: float, pair_count: int, tokens: int, flops: float) -> dict[str, float]:
        s = max(seconds, 1e-9)
        return {
            "seconds": seconds,
            "pairs": pair_count,
            "pairs_per_s": pair_count / s,
            "task_tokens": tokens,
            "task_tokens_per_s": tokens / s,
            "useful_flops": flops,
            "useful_flops_per_s": flops / s,
            "fraction_of_peak": flops / s / peak,
        }

    results: dict[str, Any] = {
        "nuggets_jax": {
            **rates(ours["wall_s"], pairs, num_candidates * task_tokens_per_candidate, useful_flops),
            "engine_reported_flops": ours["engine_flops"],
            "fraction_of_best_matmul": useful_flops / max(ours["wall_s"], 1e-9) / best_any,
            "compiles_after_warmup": compiles.count,
            "compile_seconds_after_warmup": compiles.seconds,
        },
        "nuggets_jax_zero_shot": rates(zero["wall_s"], num_tasks, task_tokens_per_candidate, zero["flops"]),
    }
    rows = [
        ["nuggets_jax one-shot", results["nuggets_jax"]],
        ["nuggets_jax zero-shot", results["nuggets_jax_zero_shot"]],
    ]
    agreement: dict[str, Any] = {}
    ours_win = np.mean(ours["one_logp"] > zero["logp"][None, :], axis=1)  # [C]
    if not args.skip_torch:
        executed = sum(
            num_tasks * common.original_pair_flops(model_config, len(p), task_cut) + model_config.prefix_flops(len(p))
            for p in prefixes.ids
        )
        results["torch"] = {
            **rates(ref["one_s"], pairs, num_candidates * task_tokens_per_candidate, useful_flops),
            "zero_shot_s": ref["zero_s"],
            "executed_flops": executed,
            "executed_flops_per_s": executed / ref["one_s"],
            "executed_fraction_of_peak": executed / ref["one_s"] / peak,
            "threads": args.torch_threads,
            "attn_implementation": args.torch_attn or torch_baseline.DEFAULT_ATTN_IMPLEMENTATION,
            "task_batch": args.torch_task_batch,
            "padded_task_tokens": task_cut,
        }
        results["torch_zero_shot"] = rates(ref["zero_s"][0], num_tasks, task_tokens_per_candidate, zero["flops"])
        rows += [
            ["torch baseline one-shot", results["torch"]],
            ["torch baseline zero-shot", results["torch_zero_shot"]],
        ]
        ref_win = torch_baseline.win_rate(ref["one_logp"], ref["zero_logp"])
        agreement["torch"] = {
            "n_tokens_equal": bool(np.array_equal(ref["n_tokens"], tasks.n_tokens)),
            "max_abs_diff_per_token_one": _per_token_diff(ours["one_logp"], ref["one_logp"], n_tokens),
            "max_abs_diff_per_token_zero": _per_token_diff(zero["logp"], ref["zero_logp"], n_tokens),
            "one_correct_mismatches": int(np.sum(ours["one_correct"] != ref["one_correct"])),
            "zero_correct_mismatches": int(np.sum(zero["correct"] != ref["zero_correct"])),
            "win_rates_identical": bool(np.array_equal(ours_win, ref_win)),
            "win_rate_nuggets_jax": ours_win,
            "win_rate_torch": ref_win,
        }
    if not args.skip_no_cache:
        results["no_cache"] = {
            **rates(plain["wall_s"], pairs, num_candidates * task_tokens_per_candidate, useful_flops),
            "fill": sum(s["sequence_tokens"] for s in plain["stats"]) / sum(s["slot_tokens"] for s in plain["stats"]),
            "padded_length": no_cache.length,
            "rows": no_cache.rows,
            "compile_s": no_cache.compile_s,
        }
        rows.append(["no prefix cache one-shot", results["no_cache"]])
        plain_win = np.mean(plain["one_logp"] > zero["logp"][None, :], axis=1)
        agreement["no_cache"] = {
            "max_abs_diff_per_token_one": _per_token_diff(ours["one_logp"], plain["one_logp"], n_tokens),
            "one_correct_mismatches": int(np.sum(ours["one_correct"] != plain["one_correct"])),
            "win_rates_identical": bool(np.array_equal(ours_win, plain_win)),
        }

    ratios: dict[str, float] = {}
    if "torch" in results:
        ratios["nuggets_jax_over_torch"] = results["nuggets_jax"]["pairs_per_s"] / results["torch"]["pairs_per_s"]
        for name in ("no_cache",):
            if name in results:
                ratios[f"{name}_over_torch"] = results[name]["pairs_per_s"] / results["torch"]["pairs_per_s"]
    if "no_cache" in results:
        ratios["nuggets_jax_over_no_cache"] = results["nuggets_jax"]["pairs_per_s"] / results["no_cache"]["pairs_per_s"]

    # CPU seconds over wall seconds x cores, per system turn: well below 100% means the machine was
    # busy with other work (or the system left cores idle), so its times understate it.
    cores = machine["cpus_usable"] or 1
    for system, key in (("nuggets_jax", "nuggets_jax"), ("torch", "torch"), ("no_cache", "no_cache")):
        turns = [t for t in timeline if t["system"] == system]
        if turns and key in results:
            results[key]["cpu_utilisation"] = sum(t["cpu_s"] for t in turns) / (
                sum(t["total_s"] for t in turns) * cores
            )

    # -- print ------------------------------------------------------------------------------------
    torch_pairs = results.get("torch", {}).get("pairs_per_s")
    table = [
        [
            name,
            r["pairs"],
            r["seconds"],
            r["pairs_per_s"],
            r["task_tokens_per_s"],
            r["useful_flops_per_s"] / 1e9,
            100 * r["fraction_of_peak"],
            r["pairs_per_s"] / torch_pairs if torch_pairs and "one-shot" in name else "",
            100 * r["cpu_utilisation"] if "cpu_utilisation" in r else "",
        ]
        for name, r in rows
    ]
    print(
        f"\n{machine['cpu_model']}, {machine['cpus_usable']} cores, jax {machine['versions']['jax']}, "
        f"{machine['date_utc']}; {args.model} float32, workload {workload.name}: {num_candidates} candidates x "
        f"{num_tasks} tasks ({args.preset}, tasks cut at {task_cut}), {len(groups)} interleaved round(s); "
        f"load average at start {load_average_start[0]:.1f}, at end {os.getloadavg()[0]:.1f}"
    )
    common.print_table(
        ["system", "pairs", "seconds", "pairs/s", "task tok/s", "useful GFLOP/s", "% of peak", "x torch", "CPU use %"],
        table,
        title=f"scoring (peak = best jitted matmul {args.matmul_size}^2 f32 of the run = {peak / 1e9:.1f} GFLOP/s)",
    )
    rounds = "".join(f", round {r} {m['flops_per_s'] / 1e9:.1f}" for r, m in enumerate(peaks.get("rounds", [])))
    print(
        f"matmul peak: before {peaks['before']['flops_per_s'] / 1e9:.1f}{rounds}, after "
        f"{peaks['after']['flops_per_s'] / 1e9:.1f} GFLOP/s (jax)"
        + (
            f"; torch {torch_peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({args.torch_threads} threads)"
            if torch_peak
            else ""
        )
    )
    print(
        f"nuggets_jax one-shot useful FLOP/s / best matmul of either library ({best_any / 1e9:.1f} GFLOP/s): "
        f"{100 * results['nuggets_jax']['fraction_of_best_matmul']:.1f}%"
    )
    facts = _engine_facts(engine)
    print(f"engine: {facts}; overrides {session.engine_overrides or 'none'}")
    print(f"compiles: warm-up {warm_up['compiles']}, after warm-up {compiles.count}")
    if "torch" in results:
        print(
            f"torch executes {results['torch']['executed_flops'] / useful_flops:.2f}x the useful FLOPs "
            f"(padding to {task_cut} tokens, full LM head): "
            f"{100 * results['torch']['executed_fraction_of_peak']:.0f}% of peak executed"
        )
        a = agreement["torch"]
        print(
            f"agreement with torch: max |diff|/token one-shot {a['max_abs_diff_per_token_one']:.2e}, zero-shot "
            f"{a['max_abs_diff_per_token_zero']:.2e}; argmax mismatches {a['one_correct_mismatches']} + "
            f"{a['zero_correct_mismatches']}; win rates identical: {a['win_rates_identical']}"
        )
    if "no_cache" in agreement:
        a = agreement["no_cache"]
        print(
            f"agreement with no-cache: max |diff|/token {a['max_abs_diff_per_token_one']:.2e}, argmax mismatches "
            f"{a['one_correct_mismatches']}; win rates identical: {a['win_rates_identical']}"
        )
    if ratios:
        print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    targets = _targets(results, ratios)
    print(f"targets ({workload.name}): {_format_targets(targets)}")
    rss = common.peak_rss_bytes()
    print(f"peak RSS {rss / 2**30:.2f} GiB")

    output = {
        "workload": dataclasses.asdict(workload),
        "machine": machine,
        "args": vars(args),
        "engine_config": dataclasses.asdict(engine.config),
        "engine": facts,
        "inputs": summary,
        "matmul_peak": {**peaks, "peak_flops_per_s": peak, "torch": torch_peak, "best_any_flops_per_s": best_any},
        "warm_up": warm_up,
        "results": results,
        "ratios": ratios,
        "agreement": agreement,
        "targets": targets,
        "timeline": timeline,
        "peak_rss_bytes": rss,
        "load_average_start": load_average_start,
        "load_average_end": list(os.getloadavg()),
        "jax_devices": [str(d) for d in jax.devices()],
    }
    workdir.cleanup()
    return output


def _targets(results: dict[str, Any], ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each target's value, goal and whether it is met (the speedup only where torch ran)."""
    targets = {
        "useful_fraction_of_peak": (results["nuggets_jax"]["fraction_of_peak"], TARGET_PEAK_FRACTION),
        "compiles_after_warmup": (results["nuggets_jax"]["compiles_after_warmup"], 0),
    }
    if "nuggets_jax_over_torch" in ratios:
        targets["speedup_over_torch"] = (ratios["nuggets_jax_over_torch"], TARGET_SPEEDUP)
    return {
        name: {
            "value": value,
            "goal": goal,
            "met": bool(value == goal) if name == "compiles_after_warmup" else bool(value >= goal),
        }
        for name, (value, goal) in targets.items()
    }


def _format_targets(targets: dict[str, dict[str, Any]]) -> str:
    return ", ".join(
        f"{name} {t['value']:.3g} (want {'=' if name == 'compiles_after_warmup' else '>='} {t['goal']}) "
        f"{'PASS' if t['met'] else 'MISS'}"
        for name, t in targets.items()
    )


def _print_combined(outputs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One table over the workloads (one-shot rows), each workload's targets; returns the rows."""
    systems = {"nuggets_jax": "nuggets_jax", "torch": "torch baseline", "no_cache": "no prefix cache"}
    summary = []
    for name, output in outputs.items():
        results = output["results"]
        torch_pairs = results.get("torch", {}).get("pairs_per_s")
        for key, label in systems.items():
            if key in results:
                r = results[key]
                summary.append(
                    {
                        "workload": name,
                        "system": label,
                        "pairs": r["pairs"],
                        "seconds": r["seconds"],
                        "pairs_per_s": r["pairs_per_s"],
                        "useful_gflops_per_s": r["useful_flops_per_s"] / 1e9,
                        "percent_of_peak": 100 * r["fraction_of_peak"],
                        "peak_gflops_per_s": output["matmul_peak"]["peak_flops_per_s"] / 1e9,
                        "x_torch": r["pairs_per_s"] / torch_pairs if torch_pairs else None,
                    }
                )
    common.print_table(
        ["workload", "system", "pairs", "seconds", "pairs/s", "useful GFLOP/s", "% of same-run peak", "x torch"],
        [
            [
                row["workload"],
                row["system"],
                row["pairs"],
                row["seconds"],
                row["pairs_per_s"],
                row["useful_gflops_per_s"],
                row["percent_of_peak"],
                "" if row["x_torch"] is None else row["x_torch"],
            ]
            for row in summary
        ],
        title="all workloads, one-shot (each workload's peak = its own best jitted matmul of the run)",
    )
    for name, output in outputs.items():
        print(f"targets ({name}): {_format_targets(output['targets'])}")
    return summary


if __name__ == "__main__":
    main()
