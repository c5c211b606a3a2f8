"""One-shot scoring on one GPU: nuggets_jax against the original algorithm in PyTorch, at Llama sizes.

For each model shape (Llama-3.2-1B, Llama-3-8B; `tiny` runs on CPU in seconds) it builds a randomly
initialised model (no weights are downloaded) and scores the paper's task set against a sample of
candidates with both systems, each in its own subprocess so that each has the whole GPU to itself:

- nuggets_jax: `scoring.Engine` + zero-shot + `one_shot.run_one_shot`, as `benchmarks/bench_scoring.py`
  runs it (warm-up on one candidate, compiles counted, then the timed pass);
- PyTorch: HF transformers `LlamaForCausalLM` of the same shape through `torch_baseline.score_original_ids`
  (the prefix K/V once per candidate, expanded over batches of 16 tasks padded to 200 tokens, full-vocabulary
  log-softmax), timed after a warm-up candidate.

Token ids are random, with the lengths of the real data (`benchmarks/task_lengths.json`: the 100 tasks and
64 seeded candidates of the pool under the `original` preset, so the work per pair is the paper's). Useful
FLOPs are `Engine.pair_flops` of the timed candidates (the same count divides both systems' times); MFU is
useful FLOP/s over the GPU's dense bf16 peak (`PEAK_BF16_FLOPS`, or `--peak_tflops`); a jitted bf16 matmul
is measured for reference. Where agreement is on (default: tiny and 1B) the torch worker saves its weights
and the JAX worker loads them, and the per-token one-shot log-probs and win rates are compared.

The workers run one after another, never side by side, so JAX keeps its default preallocation (75% of the
GPU) and torch its caching allocator: each process exits, releasing the memory, before the next starts.

    bash benchmarks/gpu.sh                                  # 1B and 8B, both systems (H200: about 5 min)
    bash benchmarks/gpu.sh --shapes 8b --jax_candidates 64 --torch_candidates 8
    python -m benchmarks.gpu --shapes tiny                  # CPU, both systems, agreement checked
    python -m benchmarks.gpu --write_task_lengths           # recompute task_lengths.json (needs the data)
"""

from __future__ import annotations

import argparse
import dataclasses
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

TASK_LENGTHS = pathlib.Path(__file__).with_name("task_lengths.json")
TARGET_MFU_8B = 0.50
TARGET_SPEEDUP = 5.0
# Dense (no sparsity) bf16 tensor-core FLOP/s by `device_kind`; the first name contained in it wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape and how much of the data a run of it uses.

    Attributes:
      hf: the HF `config.json` fields; `ModelConfig.from_hf` and `LlamaConfig` both read them.
      dtype: parameter dtype of both systems.
      accelerator: run on the GPU (else both systems on CPU).
      jax_candidates / torch_candidates: timed candidates per system (torch: the first of the same ones).
      num_tasks: the first N tasks (None: all 100).
      task_cut: tasks cut to this many tokens; the PyTorch baseline pads to it.
      prefix_cut: prefixes cut to this many tokens (None: as measured).
      matmul_size: side of the reference matmul.
    """

    hf: dict[str, Any]
    dtype: str
    accelerator: bool
    jax_candidates: int
    torch_candidates: int
    num_tasks: int | None = None
    task_cut: int = 200
    prefix_cut: int | None = None
    matmul_size: int = 8192


def _llama(**fields: Any) -> dict[str, Any]:
    return {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 1, **fields}


SHAPES = {
    "tiny": Shape(
        # A large init range so that the prefix visibly moves the log-probs (the win rates then test something).
        _llama(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=2048,
               rope_scaling={**_LLAMA3_ROPE, "original_max_position_embeddings": 256}, initializer_range=0.2),
        "float32", accelerator=False, jax_candidates=4, torch_candidates=4, num_tasks=8, task_cut=40, prefix_cut=16,
        matmul_size=256,
    ),
    "1b": Shape(
        _llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               max_position_embeddings=131072, rope_scaling={**_LLAMA3_ROPE, "original_max_position_embeddings": 8192}),
        "bfloat16", accelerator=True, jax_candidates=64, torch_candidates=16,
    ),
    "8b": Shape(
        _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
               max_position_embeddings=8192),
        "bfloat16", accelerator=True, jax_candidates=32, torch_candidates=8,
    ),
}  # fmt: skip
# Saving and reloading 16 GB of 8B weights would take a good part of the time budget: agreement is
# checked where it is cheap; `--agreement tiny,1b,8b` adds the 8B shape.
DEFAULT_AGREEMENT = "tiny,1b"


def log(message: str) -> None:
    print(f"[gpu] {message}", file=sys.stderr, flush=True)


# -- inputs ---------------------------------------------------------------------------------------


def write_task_lengths(path: str | os.PathLike = TASK_LENGTHS, num_candidates: int = 64, seed: int = 0) -> None:
    """Measures the paper's task and prefix lengths (default model's tokenizer, `original` preset) into `path`."""
    import transformers

    from nuggets_jax.models import resolve_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(resolve_model_dir("default")))
    inputs = common.load_inputs(tokenizer, num_candidates=num_candidates, seed=seed, preset="original")
    tasks = inputs.tokenized_tasks
    lengths = {
        "source": {
            "tasks": f"{common.DEFAULT_TASKS.name}: the paper's 100 K-means tasks",
            "pool": f"{common.DEFAULT_POOL.name}: {num_candidates} candidates sampled with seed {seed}",
            "tokenizer": "the default model's (SmolLM2-135M-Instruct; it adds no BOS)",
            "preset": "original: tasks cut at 200 tokens, no separator, zero-shot without special tokens",
            "command": "python -m benchmarks.gpu --write_task_lengths",
        },
        "max_task_tokens": 200,
        "task_lengths": [len(t) for t in tasks.ids],
        "response_starts": [int(s) for s in tasks.response_start],
        "task_cut": [bool(c) for c in tasks.cut],
        "candidate_indices": inputs.candidate_indices,
        "prefix_lengths": [len(p) for p in inputs.prefixes.ids],
    }
    body = ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in lengths.items())
    pathlib.Path(path).write_text("{\n" + body + "\n}\n", encoding="utf-8")
    log(f"wrote {path}")


def synthetic_inputs(
    shape: Shape, num_candidates: int, seed: int, lengths_path: str | os.PathLike = TASK_LENGTHS
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Random token ids with the measured lengths, the same in every worker for the same arguments.

    Returns:
      (task_ids T x [n_t] int32, response_starts [T] int32, prefix_ids C x [p_c] int32); candidate c has the
      length of measured prefix c modulo their number.
    """
    lengths = json.loads(pathlib.Path(lengths_path).read_text(encoding="utf-8"))
    task_lengths = np.asarray(lengths["task_lengths"][: shape.num_tasks])
    starts = np.asarray(lengths["response_starts"][: shape.num_tasks])
    task_lengths = np.minimum(task_lengths, shape.task_cut)
    starts = np.minimum(starts, task_lengths - 1)  # a cut task keeps at least one scored token
    measured = lengths["prefix_lengths"]
    prefix_lengths = [measured[c % len(measured)] for c in range(num_candidates)]
    if shape.prefix_cut:
        prefix_lengths = [min(p, shape.prefix_cut) for p in prefix_lengths]
    rng = np.random.default_rng(seed)
    vocab = shape.hf["vocab_size"]
    task_ids = [rng.integers(0, vocab, n, dtype=np.int32) for n in task_lengths]
    prefix_ids = [rng.integers(0, vocab, p, dtype=np.int32) for p in prefix_lengths]
    return task_ids, starts.astype(np.int32), prefix_ids


# -- the nuggets_jax worker -----------------------------------------------------------------------


def random_llama(config: Any, dtype: Any, seed: int) -> Any:
    """A `Llama` with random parameters created by one jitted program on the default device (no host copy)."""
    import jax
    from flax import nnx

    from nuggets_jax.models import Llama

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(seed))))
    state = jax.jit(lambda: nnx.state(Llama(config, dtype=dtype, rngs=nnx.Rngs(seed))))()
    return nnx.merge(graphdef, state)


def _engine_config(overrides: dict[str, str]) -> Any:
    """EngineConfig with `NAME=VALUE` overrides (types from the field defaults)."""
    from nuggets_jax.scoring.engine import EngineConfig

    defaults = EngineConfig()
    typed = {}
    for name, value in overrides.items():
        if not hasattr(defaults, name):
            raise SystemExit(f"error: --engine {name}: EngineConfig has no field {name!r}")
        kind = type(getattr(defaults, name))
        typed[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return dataclasses.replace(defaults, **typed)


def jax_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Times nuggets_jax on one shape (`job` from `_job`); returns its numbers and scores."""
    import jax
    import jax.numpy as jnp

    from nuggets_jax.data import TokenizedPrefixes, TokenizedTasks
    from nuggets_jax.models import ModelConfig, load_params
    from nuggets_jax.scoring import engine as scoring
    from nuggets_jax.scoring import one_shot
    from nuggets_jax.store import ScoreStore

    shape = SHAPES[job["shape"]]
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[shape.dtype]
    device = jax.devices()[0]
    config = ModelConfig.from_hf(shape.hf, source=f"shape {job['shape']}")
    start = time.perf_counter()
    if job["checkpoint"]:
        model = load_params(job["checkpoint"], config, dtype=dtype)
    else:
        model = random_llama(config, dtype, job["seed"])
    jax.block_until_ready(jax.tree.leaves(model))
    init_s = time.perf_counter() - start
    log(f"{job['shape']} jax: parameters {'loaded' if job['checkpoint'] else 'initialised'} in {init_s:.1f}s")
    matmul = common.matmul_peak(shape.matmul_size, dtype=dtype)
    log(f"{job['shape']} jax: measured {shape.dtype} matmul {matmul['flops_per_s'] / 1e12:.1f} TFLOP/s")

    task_ids, starts, prefix_ids = synthetic_inputs(shape, job["candidates"], job["seed"], job["task_lengths"])
    num_tasks, num_candidates = len(task_ids), len(prefix_ids)
    tasks = TokenizedTasks(
        ids=task_ids, response_start=starts, n_tokens=np.asarray([len(t) for t in task_ids]) - starts,
        cut=np.zeros(num_tasks, bool),
    )  # fmt: skip
    prefixes = TokenizedPrefixes(ids=prefix_ids, cut=np.zeros(num_candidates, bool), zero_shot=np.zeros(0, np.int32))
    candidate_ids, task_names = [str(c) for c in range(num_candidates)], [str(t) for t in range(num_tasks)]

    def engine_log(message: str) -> None:
        log(f"{job['shape']} jax: {message}")

    compiles = common.CompileCounter()
    engine = scoring.Engine(
        model, tasks, scoring.prefix_lengths_of(prefixes), _engine_config(job["engine"]), log=engine_log
    )
    workdir = tempfile.TemporaryDirectory(prefix="gpu_bench_")
    start = time.perf_counter()
    with compiles:
        engine.zero_shot(prefixes.zero_shot)
        one_shot.run_one_shot(
            engine, common.subset_prefixes(prefixes, [0]), ScoreStore(pathlib.Path(workdir.name) / "warm_up"),
            candidate_ids[:1], task_names, progress=False, log=engine_log,
        )  # fmt: skip
    warm_up = {"seconds": time.perf_counter() - start, "compiles": compiles.count}
    compiles.count, compiles.seconds = 0, 0.0
    with compiles:
        zero_logp, zero_correct, zero_stats = engine.zero_shot(prefixes.zero_shot)
        result = one_shot.run_one_shot(
            engine, prefixes, ScoreStore(pathlib.Path(workdir.name) / "timed"), candidate_ids, task_names,
            progress=job["progress"], log=engine_log,
        )  # fmt: skip
    workdir.cleanup()
    seconds = result.stats.wall_s
    candidate_flops = [engine.pair_flops(len(p)) for p in prefix_ids]
    log(f"{job['shape']} jax: {num_candidates} candidates x {num_tasks} tasks in {seconds:.2f}s")
    stats = device.memory_stats() or {}
    return {
        "system": "nuggets_jax",
        "device_kind": device.device_kind,
        "platform": device.platform,
        "machine": common.machine_info(),
        "init_s": init_s,
        "matmul": matmul,
        "engine": {
            "config": dataclasses.asdict(engine.config),
            "candidates_per_call": engine.slots,
            "row_length": engine.row_length,
            "prefix_buckets": list(engine.buckets),
            "programs": engine.programs,
            "compile_s": engine.compile_s,
        },
        "warm_up": warm_up,
        "compiles_after_warmup": compiles.count,
        "candidates": num_candidates,
        "tasks": num_tasks,
        "seconds": seconds,
        "zero_shot_s": zero_stats.wall_s,
        "candidate_flops": candidate_flops,
        "useful_flops": float(sum(candidate_flops)),
        "engine_flops": result.stats.flops,
        "peak_memory_bytes": stats.get("peak_bytes_in_use"),
        "memory_limit_bytes": stats.get("bytes_limit"),
        "n_tokens": tasks.n_tokens,
        "zero_logp": zero_logp,
        "zero_correct": zero_correct,
        "one_logp": result.one_logp,
        "one_correct": result.one_correct,
    }


# -- the PyTorch worker ---------------------------------------------------------------------------


def torch_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Times the original algorithm in PyTorch on one shape; with `job["checkpoint"]` saves the weights there."""
    import torch
    import transformers

    from benchmarks import torch_baseline

    shape = SHAPES[job["shape"]]
    device = torch.device("cuda" if shape.accelerator else "cpu")
    torch.manual_seed(job["seed"])
    config = transformers.LlamaConfig(**{k: v for k, v in shape.hf.items() if k != "model_type"})
    start = time.perf_counter()
    with device:  # parameters are created on the GPU, initialised there
        model = transformers.LlamaForCausalLM._from_config(
            config, dtype=getattr(torch, shape.dtype), attn_implementation=torch_baseline.DEFAULT_ATTN_IMPLEMENTATION
        ).eval()
    init_s = time.perf_counter() - start
    log(f"{job['shape']} torch: parameters initialised on {device} in {init_s:.1f}s")
    if job["checkpoint"]:
        start = time.perf_counter()
        model.save_pretrained(job["checkpoint"])
        log(f"{job['shape']} torch: weights saved for the agreement check in {time.perf_counter() - start:.1f}s")

    task_ids, starts, prefix_ids = synthetic_inputs(shape, job["candidates"], job["seed"], job["task_lengths"])
    task_ids, prefix_ids = [t.tolist() for t in task_ids], [p.tolist() for p in prefix_ids]
    batch = job["torch_task_batch"]

    def run(tasks: slice, candidates: slice, progress: bool) -> dict[str, Any]:
        return torch_baseline.score_original_ids(
            model, task_ids[tasks], starts[tasks], prefix_ids[candidates], task_batch=batch,
            max_task_tokens=shape.task_cut, progress=progress,
        )  # fmt: skip

    run(slice(0, batch), slice(0, 1), False)  # warm-up: kernels chosen, allocator grown
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = run(slice(None), slice(None), job["progress"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - start
    seconds = out["timings"]["one_s"]
    log(f"{job['shape']} torch: {len(prefix_ids)} candidates x {len(task_ids)} tasks in {seconds:.2f}s")
    return {
        "system": "torch",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "machine": common.machine_info(),
        "attn_implementation": torch_baseline.DEFAULT_ATTN_IMPLEMENTATION,
        "task_batch": batch,
        "init_s": init_s,
        "candidates": len(prefix_ids),
        "tasks": len(task_ids),
        "seconds": seconds,
        "zero_shot_s": out["timings"]["zero_s"],
        "wall_s": wall_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        **{key: out[key] for key in ("n_tokens", "zero_logp", "zero_correct", "one_logp", "one_correct")},
    }


def run_job(path: str) -> None:
    """Worker entry point: runs the job file's system and writes its result next to it."""
    job = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    result = (jax_worker if job["system"] == "jax" else torch_worker)(job)
    text = json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in result.items()})
    pathlib.Path(job["out"]).write_text(text, encoding="utf-8")


# -- the parent: workers, numbers, tables ---------------------------------------------------------


def _job(system: str, name: str, args: argparse.Namespace, workdir: pathlib.Path, checkpoint: str | None) -> dict:
    shape = SHAPES[name]
    candidates = {"jax": args.jax_candidates, "torch": args.torch_candidates}[system]
    return {
        "system": system,
        "shape": name,
        "candidates": candidates.get(name, getattr(shape, f"{system}_candidates")),
        "seed": args.seed,
        "task_lengths": str(args.task_lengths),
        "checkpoint": checkpoint,
        "engine": args.engine,
        "torch_task_batch": args.torch_task_batch,
        "progress": args.progress,
        "out": str(workdir / f"{name}_{system}.json"),
    }


def run_worker(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Runs one job in a fresh interpreter; its result, or {"error": ...}."""
    workdir = pathlib.Path(job["out"]).parent
    job_path = workdir / f"{job['shape']}_{job['system']}_job.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")]))}
    if not SHAPES[job["shape"]].accelerator:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    log(f"{job['shape']} {job['system']}: starting ({job['candidates']} candidates)")
    start = time.perf_counter()
    command = [sys.executable, "-m", "benchmarks.gpu", "--worker", str(job_path)]
    try:
        done = subprocess.run(command, cwd=common.REPO, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s"}
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": f"exit status {done.returncode} after {elapsed:.0f}s (its traceback is above)"}
    result = json.loads(pathlib.Path(job["out"]).read_text(encoding="utf-8"))
    log(f"{job['shape']} {job['system']}: done in {elapsed:.0f}s (process start to exit)")
    return {**result, "process_s": elapsed}


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    """The GPU's dense bf16 peak: `--peak_tflops`, else `PEAK_BF16_FLOPS` by device kind (None: unknown)."""
    if override_tflops:
        return override_tflops * 1e12
    return next((flops for name, flops in PEAK_BF16_FLOPS if name.lower() in device_kind.lower()), None)


def agreement(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Per-token log-prob differences and win rates on the candidates both systems scored."""
    from nuggets_jax import metrics

    count = min(ours["candidates"], ref["candidates"])
    n_tokens = np.asarray(ref["n_tokens"], np.float64)

    def scores(result: dict[str, Any]) -> tuple[np.ndarray, ...]:
        zero = np.asarray(result["zero_logp"], np.float64), np.asarray(result["zero_correct"], np.float64)
        one = np.asarray(result["one_logp"], np.float64)[:count], np.asarray(result["one_correct"], np.float64)[:count]
        return (*zero, *one)

    a, b = scores(ours), scores(ref)
    win_a = metrics.per_task("win_rate", a[0], a[1], n_tokens, a[2], a[3]).mean(axis=1)
    win_b = metrics.per_task("win_rate", b[0], b[1], n_tokens, b[2], b[3]).mean(axis=1)
    return {
        "candidates": count,
        "n_tokens_equal": bool(np.array_equal(ours["n_tokens"], ref["n_tokens"])),
        "max_abs_diff_per_token_one": float(np.max(np.abs(a[2] - b[2]) / n_tokens)),
        "max_abs_diff_per_token_zero": float(np.max(np.abs(a[0] - b[0]) / n_tokens)),
        "argmax_mismatches": int(np.sum(a[3] != b[3]) + np.sum(a[1] != b[1])),
        "win_rates_identical": bool(np.array_equal(win_a, win_b)),
        "win_rate_nuggets_jax": win_a.tolist(),
        "win_rate_torch": win_b.tolist(),
    }


def summarize(name: str, ours: dict[str, Any], ref: dict[str, Any] | None, peak_override: float | None) -> dict:
    """Rates, MFU, memory and the ratio of one shape; the raw scores are dropped."""
    scores = ("n_tokens", "zero_logp", "zero_correct", "one_logp", "one_correct", "candidate_flops")
    out: dict[str, Any] = {}
    peak = peak_flops(ours.get("device_kind", ""), peak_override) if "error" not in ours else None
    for system, result in (("nuggets_jax", ours), ("torch", ref)):
        if result is None or "error" in result:
            out[system] = result
            continue
        entry = {k: v for k, v in result.items() if k not in scores}
        pairs = result["candidates"] * result["tasks"]
        entry.update(pairs=pairs, pairs_per_s=pairs / result["seconds"])
        if "error" not in ours:  # both systems' useful work is nuggets_jax's FLOP count of the same candidates
            entry["useful_flops"] = float(sum(ours["candidate_flops"][: result["candidates"]]))
            entry["useful_flops_per_s"] = entry["useful_flops"] / result["seconds"]
            entry["mfu"] = entry["useful_flops_per_s"] / peak if peak else None
            entry["fraction_of_measured_matmul"] = entry["useful_flops_per_s"] / ours["matmul"]["flops_per_s"]
        out[system] = entry
    out["peak_flops"] = peak
    ok = [s for s in ("nuggets_jax", "torch") if out[s] and "error" not in out[s]]
    if len(ok) == 2:
        out["speedup_over_torch"] = out["nuggets_jax"]["pairs_per_s"] / out["torch"]["pairs_per_s"]
        if ours.get("loaded_same_weights"):
            out["agreement"] = agreement(ours, ref)
    targets = {}
    if SHAPES[name].accelerator and "nuggets_jax" in ok:
        if name == "8b" and out["nuggets_jax"].get("mfu") is not None:
            targets["mfu"] = {"value": out["nuggets_jax"]["mfu"], "goal": TARGET_MFU_8B}
        if "speedup_over_torch" in out:
            targets["speedup_over_torch"] = {"value": out["speedup_over_torch"], "goal": TARGET_SPEEDUP}
    for target in targets.values():
        target["met"] = bool(target["value"] >= target["goal"])
    out["targets"] = targets
    return out


def _gib(value: float | None) -> str:
    return f"{value / 2**30:.1f}" if value else "n/a"


def _percent(value: float | None) -> str:
    return f"{100 * value:.1f}" if value is not None else "n/a"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], text_columns: int = 1) -> str:
    """A markdown table; the columns after the first `text_columns` (numbers) are right-aligned."""
    align = ["---" if i < text_columns else "---:" for i in range(len(headers))]
    lines = [headers, align, *([str(v) for v in row] for row in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def print_report(results: dict[str, dict[str, Any]]) -> None:
    """The markdown tables of every shape: speed, agreement, targets."""
    speed, agree = [], []
    for name, shape in results.items():
        for system in ("nuggets_jax", "torch"):
            r = shape.get(system)
            if r is not None and "error" in r:
                speed.append([name, system, f"failed: {r['error']}", *[""] * 7])
            elif r is not None:
                ratio = shape.get("speedup_over_torch") if system == "nuggets_jax" else None
                speed.append([
                    name, system, r["pairs"], f"{r['seconds']:.2f}", f"{r['pairs_per_s']:.1f}",
                    f"{r['useful_flops_per_s'] / 1e12:.2f}" if "useful_flops_per_s" in r else "n/a",
                    _percent(r.get("mfu")), _percent(r.get("fraction_of_measured_matmul")),
                    _gib(r.get("peak_memory_bytes")), f"{ratio:.2f}" if ratio else "",
                ])  # fmt: skip
        a = shape.get("agreement")
        if a is None:
            agree.append([name, f"skipped: {shape.get('agreement_skipped', 'a system failed')}", "", "", "", ""])
        else:
            agree.append([
                name, a["candidates"], f"{a['max_abs_diff_per_token_one']:.2e}",
                f"{a['max_abs_diff_per_token_zero']:.2e}", a["argmax_mismatches"], a["win_rates_identical"],
            ])  # fmt: skip
    headers = ["shape", "system", "pairs", "seconds", "pairs/s", "useful TFLOP/s", "MFU %", "% of matmul"]
    print("\n" + markdown_table([*headers, "peak mem GiB", "x torch"], speed, text_columns=2))
    headers = ["shape", "candidates", "max abs diff/token one-shot", "zero-shot", "argmax mismatches"]
    print("\n" + markdown_table([*headers, "win rates identical"], agree))
    print()
    for name, shape in results.items():
        ours = shape.get("nuggets_jax") or {}
        if "matmul" in ours:
            m = ours["matmul"]
            peak = f"{shape['peak_flops'] / 1e12:.0f}" if shape["peak_flops"] else "unknown"
            print(
                f"{name}: {ours['device_kind']}, peak {peak} TFLOP/s, measured {m['dtype']} matmul {m['size']}^3 "
                f"{m['flops_per_s'] / 1e12:.1f} TFLOP/s; {ours['engine']['programs']} programs compiled in "
                f"{ours['engine']['compile_s']:.1f}s, {ours['compiles_after_warmup']} compiles after warm-up"
            )
        for target, t in shape["targets"].items():
            print(f"target {name} {target}: {t['value']:.3g} (want >= {t['goal']:g}) {'PASS' if t['met'] else 'MISS'}")


def _per_shape(text: str | None) -> dict[str, int]:
    """ "1b=64,8b=32" (or "16" for every shape) -> {shape: count}."""
    if not text:
        return {}
    if "=" not in text:
        return dict.fromkeys(SHAPES, int(text))
    return {name: int(count) for name, count in (item.split("=", 1) for item in text.split(","))}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--jax_candidates", type=_per_shape, default={}, help="'1b=64,8b=32' or one count for all")
    parser.add_argument("--torch_candidates", type=_per_shape, default={}, help="'1b=16,8b=8' or one count for all")
    parser.add_argument("--agreement", default=DEFAULT_AGREEMENT, help="shapes whose weights both systems share")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: table)")
    parser.add_argument("--engine", default="", help="EngineConfig overrides, 'candidates_per_device=2,...'")
    parser.add_argument("--torch_task_batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task_lengths", default=str(TASK_LENGTHS))
    parser.add_argument("--worker_timeout", type=float, default=600.0, help="seconds per worker process")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    parser.add_argument("--out", default=str(common.REPO / "benchmarks" / "results" / "gpu.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write_task_lengths", action="store_true", help="recompute --task_lengths from the data")
    args = parser.parse_args(argv)
    args.engine = dict(item.split("=", 1) for item in args.engine.split(",") if item)
    unknown = [s for s in [*args.shapes.split(","), *args.agreement.split(",")] if s and s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    return args


def _nvidia_smi() -> str | None:
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every shape's workers, prints the tables, writes and returns every number."""
    args = _parse_args(argv)
    if args.worker:
        run_job(args.worker)
        return {}
    if args.write_task_lengths:
        write_task_lengths(args.task_lengths)
        return {}
    started = time.perf_counter()
    shapes = [s for s in args.shapes.split(",") if s]
    shared = set(args.agreement.split(","))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        workdir = pathlib.Path(tmp)
        for name in shapes:
            same_weights = name in shared and not args.skip_torch
            checkpoint = str(workdir / f"{name}_weights") if same_weights else None
            ref = (
                None
                if args.skip_torch
                else run_worker(_job("torch", name, args, workdir, checkpoint), args.worker_timeout)
            )
            loaded = checkpoint is not None and ref is not None and "error" not in ref
            ours = run_worker(_job("jax", name, args, workdir, checkpoint if loaded else None), args.worker_timeout)
            ours["loaded_same_weights"] = loaded
            results[name] = summarize(name, ours, ref, args.peak_tflops)
            if not same_weights:
                results[name]["agreement_skipped"] = (
                    "torch skipped" if args.skip_torch else "off for this shape (--agreement)"
                )
    print_report(results)
    output = {
        "machine": {**common.machine_info(), "nvidia_smi": _nvidia_smi()},
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "write_task_lengths")},
        "shapes": {name: {"hf_config": SHAPES[name].hf, "dtype": SHAPES[name].dtype} for name in shapes},
        "results": results,
        "total_s": time.perf_counter() - started,
    }
    log(f"all shapes done in {output['total_s']:.0f}s")
    common.write_json(args.out, output)
    return output


def failed(output: dict[str, Any]) -> bool:
    """Whether a worker of `main`'s output failed."""
    return any(
        "error" in (shape[s] or {}) for shape in output.get("results", {}).values() for s in ("nuggets_jax", "torch")
    )


if __name__ == "__main__":
    sys.exit(1 if failed(main()) else 0)
