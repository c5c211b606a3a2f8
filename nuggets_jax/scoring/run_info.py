"""run.json of a scoring run: what ran, on what, how fast (docs/ARCHITECTURE.md, "The workdir of a scoring run").

`job.run_score` fills a `RunInfo` from its phases; `report` reads the file back (every key optional).
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from typing import Any

import numpy as np


@dataclasses.dataclass
class Timings:
    """Seconds per phase (run.json "timings")."""

    load_s: float = 0.0
    tokenize_s: float = 0.0
    compile_s: float = 0.0
    zero_shot_s: float = 0.0
    one_shot_s: float = 0.0
    baselines_s: float = 0.0
    write_s: float = 0.0

    @contextlib.contextmanager
    def timed(self, field: str):
        t0 = time.perf_counter()
        yield
        setattr(self, field, time.perf_counter() - t0)


@dataclasses.dataclass(frozen=True)
class Counts:
    candidates: int
    tasks: int
    pairs: int
    selected: int | None  # None on processes other than 0 (they write no golden set)

    @classmethod
    def of(cls, num_candidates: int, num_tasks: int, selected: np.ndarray | None) -> Counts:
        return cls(num_candidates, num_tasks, num_candidates * num_tasks, None if selected is None else len(selected))


@dataclasses.dataclass(frozen=True)
class Cuts:
    candidates_cut: int
    tasks_cut: int
    max_prefix_tokens: int | None
    max_task_tokens: int | None

    @classmethod
    def of(cls, prefixes, tasks, policy) -> Cuts:
        """From the tokenized pool and tasks and the token policy that cut them."""
        return cls(int(prefixes.cut.sum()), int(tasks.cut.sum()), policy.max_prefix_tokens, policy.max_task_tokens)

    @classmethod
    def of_baselines(cls, seqs, policy) -> Cuts:
        """A baseline run's: candidates whose record was cut at max_task_tokens, no task set."""
        cut = int(seqs.tasks.cut[: seqs.length.size].sum())
        return cls(cut, 0, None, policy.max_task_tokens)


ADAPTIVE_ONLY = ("pairs_scored", "pairs_exact", "compute_fraction", "adaptive")
# Written only when the baseline pass ran (its PassStats; "pairs" counts its sequences).
BASELINES_ONLY = ("baselines",)
# Written only for a diversity-aware golden set (select.Diversity's fields).
DIVERSITY_ONLY = ("diversity",)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """run.json: what ran, on what, how fast. Throughputs count what this invocation computed (a
    resumed run only its own work); the `ADAPTIVE_ONLY` fields (`rounds.summary`) are written in
    adaptive mode only, `baselines` when the baseline pass ran. A baseline run (its metric a
    baseline; `mode` "baselines") has no task set: its throughputs are the baseline pass's."""

    devices: dict[str, Any]  # count, platform, kind, processes, host
    model: dict[str, Any]  # path, dir, dtype, parameters
    mesh: dict[str, int]  # {"data": ..., "model": ...}
    param_bytes_per_device: int
    program_bytes_per_device: int  # the largest compiled scoring program (XLA memory analysis)
    host_traffic: dict[str, int]  # bytes this process received in host collectives, by phase/purpose
    counts: Counts
    timings: Timings
    zero_shot: dict[str, float]  # PassStats.as_dict()
    one_shot: dict[str, float]
    tokens_per_s: float
    pairs_per_s: float
    flops_per_s: float
    wall_s: float
    programs_compiled: int
    compiles_after_warmup: int
    buckets: dict[str, Any]  # the engine's shapes: prefix, row_length, rows_per_group, groups, fill, ...
    cuts: Cuts
    resumed_candidates: int
    selection: dict[str, float | int]  # SelectionRule.as_dict()
    mode: str
    pairs_scored: int | None
    pairs_exact: int | None
    compute_fraction: float | None
    adaptive: dict[str, Any] | None
    jax: str
    baselines: dict[str, float] | None = None
    diversity: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        info = dataclasses.asdict(self)
        return {
            k: v for k, v in info.items() if not (k in (*ADAPTIVE_ONLY, *BASELINES_ONLY, *DIVERSITY_ONLY) and v is None)
        }


def devices() -> dict[str, Any]:
    """run.json "devices": count, platform, kind, processes, host."""
    import jax

    return {
        "count": jax.device_count(),
        "platform": jax.default_backend(),
        "kind": jax.devices()[0].device_kind,
        "processes": jax.process_count(),
        "host": platform.node(),
    }


def cpu_choice(count: int, why: str, applied: bool) -> dict[str, Any]:
    """run.json "devices.cpu_devices": the XLA:CPU devices chosen (job.cpu_devices) and whether
    they took effect (not when the backend had already started in this process)."""
    import jax

    return {"chosen": count, "why": why, "applied": applied, "count": len(jax.devices("cpu"))}


def model_info(model_config, model_dir, state, dtype: str) -> dict[str, Any]:
    """run.json "model": the config's path, the dtype it ran in, the resolved folder, the parameter count."""
    import jax

    return {
        "path": str(model_config.path),
        "dir": str(model_dir),
        "dtype": dtype,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state))),
    }


def engine_shapes(engine) -> dict[str, Any]:
    """run.json "buckets": the shapes the engine compiled for."""
    return {
        "prefix": engine.buckets,
        "row_length": engine.row_length,
        "rows_per_group": engine.rows_per_group,
        "groups": len(engine.layout.groups),
        "fill": engine.layout.fill,
        "candidates_per_call": engine.slots,
    }
