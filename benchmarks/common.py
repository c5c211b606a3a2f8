"""What the benchmarks share: inputs, the machine's matmul peak, memory, tables, JSON, FLOP counts.

Nothing here imports jax at module level: a benchmark sets XLA_FLAGS (`set_xla_flags`) before the
first jax import, and `bench_scaling` workers set JAX_NUM_CPU_DEVICES the same way.
The projection of the paper's full job is `benchmarks/projection.py`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # public record files, their sources in SOURCES.md there
DATA = SHARED_DATA / "nuggets"
DEFAULT_POOL = DATA / "alpaca_gpt4_bad.json"
DEFAULT_TASKS = DATA / "alpaca_gpt4_kmeans_100.json"
# A random 9,229-record sample of the original Stanford Alpaca-52k (text-davinci-003 outputs), from
# gpt4life/alpagasus; 4 of its records have an empty output (`read_records(skip_empty_outputs=True)`).
ALPACA_POOL = SHARED_DATA / "alpagasus" / "random_9k.json"
GENERATED = "default"  # a pool or tasks spec meaning the main job's generated data, as `data.pool=default`
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def set_xla_flags(flags: str | None) -> None:
    """Appends `flags` to XLA_FLAGS; must run before jax is first imported (XLA reads it once)."""
    if not flags:
        return
    if "jax" in sys.modules:
        raise RuntimeError("--xla_flags must be applied before jax is imported; import jax later in the script")
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags]))


def usable_cores() -> int:
    from nuggets_jax import sharding

    return sharding.usable_cores()


def set_cpu_devices(count: int) -> None:
    """Splits the host into `count` XLA:CPU devices; must run before jax's backend starts.

    One device per core runs one candidate's program per core side by side (the engine shards
    candidates over devices). A single device spreads each op over the cores instead, which leaves
    cores idle in the many small attention and softmax ops of a block (BENCHMARKS.md, section 1).
    """
    from nuggets_jax import sharding

    if not sharding.set_cpu_devices(count):
        raise RuntimeError("set_cpu_devices must run before jax's backend starts")


# -- inputs ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchInputs:
    """A seeded sample of candidates and a task set, as records, dicts and token ids.

    Attributes:
      candidate_indices: positions of the sampled candidates in the pool (after any dropped records).
      candidates: the sampled `nuggets_jax.data.Record`s.
      tasks: the task `Record`s.
      candidate_dicts / task_dicts: the same as plain dicts (what the PyTorch baseline takes).
      tokenized_tasks: `TokenizedTasks` under the preset's policy.
      prefixes: `TokenizedPrefixes` of the sampled candidates.
      preset: the preset name.
      policy: the `TokenPolicy` the tokens follow (the preset with `overrides`).
      pool_source / tasks_source: the files read, or the generator's name for generated data.
      dropped: where each pool record left out for an empty output was (`skip_empty_outputs`).
    """

    candidate_indices: list[int]
    candidates: list[Any]
    tasks: list[Any]
    candidate_dicts: list[dict[str, str]]
    task_dicts: list[dict[str, str]]
    tokenized_tasks: Any
    prefixes: Any
    preset: str
    policy: Any
    pool_source: str = ""
    tasks_source: str = ""
    dropped: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Token counts of the sample, for the report."""
        tasks, prefixes = self.tokenized_tasks, self.prefixes
        task_lengths = np.asarray([len(t) for t in tasks.ids])
        prefix_lengths = np.asarray([len(p) for p in prefixes.ids])
        return {
            "preset": self.preset,
            "max_task_tokens": self.policy.max_task_tokens,
            "pool": self.pool_source,
            "tasks_file": self.tasks_source,
            "pool_records_dropped": self.dropped,
            "candidates": len(self.candidates),
            "candidate_indices": self.candidate_indices,
            "tasks": len(self.tasks),
            "task_tokens_total": int(task_lengths.sum()),
            "task_tokens_mean": float(task_lengths.mean()),
            "task_tokens_max": int(task_lengths.max()),
            "response_tokens_total": int(np.sum(tasks.n_tokens)),
            "tasks_cut": int(np.sum(tasks.cut)),
            "prefix_tokens_mean": float(prefix_lengths.mean()),
            "prefix_tokens_max": int(prefix_lengths.max()),
            "zero_shot_prefix_tokens": len(prefixes.zero_shot),
        }


def sample_indices(pool_size: int, count: int, seed: int) -> list[int]:
    """`count` distinct pool positions drawn with `seed`, in pool order.

    The first `count` of one seeded permutation, so a smaller sample is a subset of a larger one
    with the same seed (the scaling sizes grow the same pool).
    """
    if not 1 <= count <= pool_size:
        raise ValueError(f"--num_candidates must be between 1 and the pool size {pool_size}, got {count}")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(pool_size)[:count])


@functools.cache
def _generated_records() -> dict[str, tuple[list[Any], str]]:
    """The main job's generated pool and tasks, read by the job's own loader (`scoring.job.load_inputs`)."""
    from configs import score as score_config
    from nuggets_jax.scoring import job

    config = score_config.get_config()
    config.data.pool = config.data.tasks = GENERATED
    with tempfile.TemporaryDirectory(prefix="bench_default_data_") as workdir:  # the job keeps a copy there
        inputs = job.load_inputs(config, pathlib.Path(workdir))
    return {"pool": (inputs.pool, inputs.pool_source), "tasks": (inputs.tasks, inputs.tasks_source)}


def read_records(
    spec: str | os.PathLike, role: str, skip_empty_outputs: bool = False
) -> tuple[list[Any], str, list[str]]:
    """The records of a pool or task set: a record file, or `GENERATED` for the main job's data.

    Args:
      spec: a .json / .jsonl / .parquet file, or "default" (the job's `data.pool=default`).
      role: "pool" or "tasks".
      skip_empty_outputs: leave out Alpaca records whose output is empty (the job refuses such a
        file; a public sample with a few of them is still a fair speed workload).

    Returns:
      (records, source, dropped): `nuggets_jax.data.Record`s, what was read, and where each left-out
      record was (`file[index]`).
    """
    from nuggets_jax import data as data_lib

    if str(spec) == GENERATED:
        records, source = _generated_records()[role]
        return records, source, []
    if not skip_empty_outputs:
        return data_lib.read_records(spec, role), str(spec), []
    objects = data_lib.read_objects(spec, f"data.{role}", what=f"{role} file", columns=data_lib.RECORD_COLUMNS)

    def empty_output(obj: Any) -> bool:
        return isinstance(obj, dict) and isinstance(obj.get("output"), str) and not obj["output"].strip()

    dropped = [where for where, obj in objects if empty_output(obj)]
    kept = [(where, obj) for where, obj in objects if not empty_output(obj)]
    return data_lib.records_from_objects(kept, str(spec), role), str(spec), dropped


def load_inputs(
    tokenizer: Any,
    pool_path: str | os.PathLike = DEFAULT_POOL,
    tasks_path: str | os.PathLike = DEFAULT_TASKS,
    num_candidates: int = 8,
    seed: int = 0,
    num_tasks: int | None = None,
    preset: str = "original",
    overrides: dict[str, Any] | None = None,
    skip_empty_outputs: bool = False,
) -> BenchInputs:
    """Reads pool and tasks, samples the candidates, tokenizes both under `preset`.

    Args:
      tokenizer: the model's tokenizer.
      pool_path: candidate records (.json list or .jsonl), or "default" (the main job's generated pool).
      tasks_path: task records, or "default" (the main job's generated tasks).
      num_candidates: how many candidates to sample (seeded, without replacement).
      seed: the sampling seed.
      num_tasks: keep only the first N tasks (smoke runs); None = all.
      preset: a key of `nuggets_jax.data.PRESETS`.
      overrides: `data.*` token-policy fields (separator, max_prefix_tokens, max_task_tokens) over the preset.
      skip_empty_outputs: leave out pool records with an empty output (`read_records`).

    Returns:
      The sample, tokenized.
    """
    from nuggets_jax import data as data_lib

    pool, pool_source, dropped = read_records(pool_path, "pool", skip_empty_outputs)
    tasks, tasks_source, _ = read_records(tasks_path, "tasks")
    if num_tasks is not None:
        if num_tasks < 1:
            raise ValueError(f"--num_tasks must be at least 1, got {num_tasks}")
        tasks = tasks[:num_tasks]
    indices = sample_indices(len(pool), num_candidates, seed)
    candidates = [pool[i] for i in indices]
    policy = data_lib.token_policy(preset, overrides)
    template = data_lib.Template()
    tokenized_tasks = data_lib.tokenize_tasks(tokenizer, tasks, template, policy, tasks_source)
    prefixes = data_lib.tokenize_prefixes(tokenizer, candidates, template, policy)

    def as_dict(record: Any) -> dict[str, str]:
        return {"instruction": record.instruction, "input": record.input, "output": record.output}

    return BenchInputs(
        candidate_indices=indices,
        candidates=candidates,
        tasks=tasks,
        candidate_dicts=[as_dict(r) for r in candidates],
        task_dicts=[as_dict(r) for r in tasks],
        tokenized_tasks=tokenized_tasks,
        prefixes=prefixes,
        preset=preset,
        policy=policy,
        pool_source=pool_source,
        tasks_source=tasks_source,
        dropped=dropped,
    )


def subset_prefixes(prefixes: Any, members: Sequence[int]) -> Any:
    """The `TokenizedPrefixes` of some candidates (same zero-shot prefix)."""
    return dataclasses.replace(
        prefixes, ids=[prefixes.ids[i] for i in members], cut=np.asarray(prefixes.cut)[list(members)]
    )


# -- the machine ----------------------------------------------------------------------------------


def matmul_peak(size: int = 2048, repeats: int = 10, dtype: Any = "float32") -> dict[str, Any]:
    """FLOP/s of a jitted [size, size] x [size, size] matmul in `dtype`, best of `repeats`.

    The best repeat is the machine's limit for this kind of work right now: other load only
    slows a repeat down.
    """
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (size, size), dtype) for k in keys)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "size": size,
        "dtype": str(jnp.dtype(dtype)),
        "repeats": repeats,
        "best_s": best,
        "median_s": float(np.median(times)),
        "flops_per_s": 2.0 * size**3 / best,
    }


def torch_matmul_peak(size: int = 2048, repeats: int = 10, threads: int = 2) -> dict[str, float]:
    """The same matmul in PyTorch with `threads` threads (what the baseline's GEMMs can reach)."""
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"size": size, "repeats": repeats, "threads": threads, "best_s": best, "flops_per_s": 2.0 * size**3 / best}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU seconds this process (all its threads) has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
                return [f for f in line.split(":", 1)[1].split() if f in wanted]
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, load, library versions, date and the exact command line of this run."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cores(),
        "load_average": list(os.getloadavg()),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers")},
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS", "OMP_NUM_THREADS")},
        # The command as typed (interpreter, -m module and every flag), so a figure can be reproduced.
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "cwd": os.getcwd(),
    }
    if "jax" in sys.modules:
        import jax

        info["jax_devices"] = [str(d) for d in jax.devices()]
        info["jax_backend"] = jax.default_backend()
    return info


class CompileCounter:
    """Counts XLA backend compilations while active (`with CompileCounter() as c: ...; c.count`).

    jax has no public way to unregister a listener, so a closed counter just stops counting.
    """

    def __init__(self) -> None:
        import jax

        self.count = 0
        self.seconds = 0.0
        self._active = False

        def listener(event: str, duration: float, **kwargs: Any) -> None:
            if self._active and event == COMPILE_EVENT:
                self.count += 1
                self.seconds += duration

        jax.monitoring.register_event_duration_secs_listener(listener)

    def __enter__(self) -> CompileCounter:
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# -- output ---------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, numbers right-aligned; floats shown with 3 significant digits or more."""

    def cell(value: Any) -> str:
        if isinstance(value, float | np.floating):
            if not np.isfinite(value):
                return str(value)
            if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
                return f"{value:.3g}"
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float | np.number) for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """Prints `format_table` with an optional title line."""
    if title:
        print(f"\n{title}")
    print(format_table(headers, rows), flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating | float):
        value = float(value)
        return value if np.isfinite(value) else str(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON (numpy values converted, non-finite floats as strings)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


# -- what the original algorithm executes (what the model needs: `ModelConfig.candidate_flops`) --


def original_pair_flops(config: Any, prefix_tokens: float, padded_task_tokens: int = 200) -> float:
    """FLOPs the original algorithm executes per pair: every padded position through body and
    full LM head, attending to the whole prefix and padded task (what it computes, not what it needs)."""
    return padded_task_tokens * config.flops_per_token() + config.attention_flops(
        padded_task_tokens, prefix_tokens + padded_task_tokens
    )
