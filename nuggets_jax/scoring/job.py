"""The scoring job: a config in, a workdir out (DESIGN.md, "Workdir of a scoring run").

`run_score` resolves the inputs, refuses a workdir that holds scores of different inputs, scores
what is not yet stored (zero-shot once, then every candidate), and process 0 writes
config.json, scores.npz, ranking.jsonl, golden.json, run.json and report.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import metrics as metrics_lib
from nuggets_jax import select as select_lib
from nuggets_jax import sharding, synthetic
from nuggets_jax import store as store_lib
from nuggets_jax.errors import UserError


class JobError(UserError):
    """A user mistake in the config or workdir; the message says what to change."""


class WorkdirMismatchError(JobError):
    """The workdir holds scores of other inputs (model, pool, tasks, template or token policy)."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Validated records plus what identifies them for the fingerprint."""

    pool: list[data_lib.Record]
    tasks: list[data_lib.Record]
    pool_source: str
    tasks_source: str
    pool_digest: str
    tasks_digest: str


def token_policy(config) -> data_lib.TokenPolicy:
    """The config's preset with any `data.*` override applied."""
    return data_lib.token_policy(config.preset, config.data)


def selection_rule(config) -> dict[str, float | int]:
    """Exactly one of select.top_n / top_fraction / threshold; top_fraction=0.1 when none is set."""
    rule = {k: config.select.get(k) for k in ("top_n", "top_fraction", "threshold")}
    rule = {k: v for k, v in rule.items() if v is not None}
    if len(rule) > 1:
        raise JobError(f"set only one of select.top_n / select.top_fraction / select.threshold, got {rule}.")
    return rule or {"top_fraction": 0.1}


def validate(config) -> None:
    """Checks everything that can be checked before loading a model."""
    if config.metric not in metrics_lib.METRICS:
        raise JobError(f"unknown metric {config.metric!r}; choose one of: {', '.join(metrics_lib.METRICS)}.")
    from nuggets_jax.models import DTYPES

    if config.model.dtype not in DTYPES:
        raise JobError(f"unknown model.dtype {config.model.dtype!r}; choose one of: {', '.join(DTYPES)}.")
    token_policy(config)
    rule = selection_rule(config)
    if "top_fraction" in rule and not 0 < rule["top_fraction"] <= 1:
        raise JobError(f"select.top_fraction must be in (0, 1], got {rule['top_fraction']}.")
    if "top_n" in rule and rule["top_n"] < 1:
        raise JobError(f"select.top_n must be at least 1, got {rule['top_n']}.")
    if config.scoring.candidates_per_device < 1 or config.scoring.tokens_per_device < 0:
        raise JobError("scoring.candidates_per_device must be positive, scoring.tokens_per_device >= 0 (0 = auto).")
    if config.scoring.mode not in ("exact", "adaptive"):
        raise JobError(f"unknown scoring.mode {config.scoring.mode!r}; choose exact or adaptive.")
    if config.scoring.mode == "adaptive":
        from nuggets_jax.scoring.adaptive.config import METRICS, AdaptiveConfig

        if config.metric not in METRICS:
            raise JobError(f"scoring.mode=adaptive supports metric {' | '.join(METRICS)}, got {config.metric!r}.")
        AdaptiveConfig.from_mapping(config.adaptive)
        ranks_pairs = config.adaptive.panel or config.adaptive.compare == "pairwise"
        if ranks_pairs and config.select.get("threshold") is not None:
            raise JobError(
                "adaptive.panel and adaptive.compare=pairwise need select.top_n or select.top_fraction, "
                "not select.threshold."
            )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_inputs(config, workdir: pathlib.Path) -> Inputs:
    """Reads (or generates) pool and task set, applies the limits, validates every record."""

    def load(spec: str, role: str, generate):
        if spec == "default":
            objects = generate()
            source = f"<generated {role}: nuggets_jax.synthetic>"
            if os.environ.get("NUGGETS_KEEP_DEFAULT_DATA", "1") == "1" and _is_main():
                path = workdir / "data" / f"{role}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                store_lib.atomic_write_bytes(path, json.dumps(objects, ensure_ascii=False, indent=1).encode())
            records = data_lib.records_from_objects(
                [(f"{source}[{i}]", o) for i, o in enumerate(objects)], source, role
            )
            return records, source, _digest(objects)
        path = pathlib.Path(spec).expanduser()
        records = data_lib.read_records(path, role)
        return records, str(path), hashlib.sha256(path.read_bytes()).hexdigest()

    pool, pool_source, pool_digest = load(config.data.pool, "pool", synthetic.generate_pool)
    tasks, tasks_source, tasks_digest = load(config.data.tasks, "tasks", synthetic.generate_tasks)
    if config.data.max_candidates:
        pool = pool[: config.data.max_candidates]
    if config.data.max_tasks:
        tasks = tasks[: config.data.max_tasks]
    if len(tasks) > config.data.task_set_limit:
        raise JobError(
            f"{tasks_source}: {len(tasks)} tasks is more than data.task_set_limit={config.data.task_set_limit} "
            f"(cost grows as pool x tasks); use data.max_tasks to take the first N, or raise the limit."
        )
    return Inputs(pool, tasks, pool_source, tasks_source, pool_digest, tasks_digest)


def fingerprint(config, inputs: Inputs, model_fingerprint: str, policy: data_lib.TokenPolicy) -> dict[str, Any]:
    """Everything that determines the scores; a resumed run must match it exactly."""
    return {
        "model": model_fingerprint,
        "dtype": config.model.dtype,
        "pool": inputs.pool_digest,
        "max_candidates": config.data.max_candidates,
        "tasks": inputs.tasks_digest,
        "max_tasks": config.data.max_tasks,
        "template": [config.data.prompt_no_input, config.data.prompt_with_input],
        "policy": dataclasses.asdict(policy),
    }


def check_fingerprint(workdir: pathlib.Path, current: dict[str, Any], fresh: bool, store) -> None:
    """Refuses to mix scores of different inputs in one workdir (unless `fresh`: start over)."""
    path = workdir / "fingerprint.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if changed and not fresh:
            n = len(list(store.root.glob("process_*/*.npz")))
            raise WorkdirMismatchError(
                f"{workdir}: holds scores of a different run ({n} saved chunk(s)); changed: {', '.join(changed)}. "
                "Use another --workdir, or add --config.fresh=True to discard the saved scores and start over."
            )
        if changed:
            store.clear()
    if _is_main():
        store_lib.atomic_write_bytes(path, json.dumps(current, indent=2, ensure_ascii=False).encode())


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def run_score(config, workdir: str | pathlib.Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the whole scoring job and returns run.json's content."""
    validate(config)
    sharding.initialize(sharding.DistributedConfig(**config.distributed.to_dict()))
    import jax

    from nuggets_jax import models
    from nuggets_jax.scoring import engine as scoring
    from nuggets_jax.scoring import one_shot as one_shot

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    workdir = pathlib.Path(workdir).expanduser()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"{workdir}: cannot create the workdir ({e.strerror}); choose a writable --workdir.") from None
    if not os.access(workdir, os.W_OK):
        raise JobError(f"{workdir}: not writable; choose a writable --workdir.")
    store = store_lib.ScoreStore(workdir, jax.process_index())
    policy = token_policy(config)
    template = data_lib.Template.from_config(config.data)
    inputs = load_inputs(config, workdir)

    adaptive_mode = config.scoring.mode == "adaptive"
    t0 = time.perf_counter()
    loaded = models.load_model(config.model.path, dtype=config.model.dtype)
    timings["load_s"] = time.perf_counter() - t0
    check_fingerprint(
        workdir,
        fingerprint(config, inputs, models.model_fingerprint(loaded.model_dir), policy),
        config.fresh,
        store,
    )
    if _is_main():
        store_lib.atomic_write_bytes(workdir / "config.json", config.to_json(indent=2).encode())

    t0 = time.perf_counter()
    tasks = data_lib.tokenize_tasks(loaded.tokenizer, inputs.tasks, template, policy, inputs.tasks_source)
    prefixes = data_lib.tokenize_prefixes(loaded.tokenizer, inputs.pool, template, policy)
    timings["tokenize_s"] = time.perf_counter() - t0
    log(
        f"data: {len(inputs.pool)} candidates ({int(prefixes.cut.sum())} cut at {policy.max_prefix_tokens} "
        f"tokens), {len(inputs.tasks)} tasks ({int(tasks.cut.sum())} cut at {policy.max_task_tokens}), "
        f"{int(tasks.n_tokens.sum())} response tokens scored per candidate"
    )

    engine_config = scoring.EngineConfig(
        **{f.name: config.scoring[f.name] for f in dataclasses.fields(scoring.EngineConfig)}
    )
    from nuggets_jax.scoring.adaptive import rounds as adaptive
    from nuggets_jax.scoring.adaptive import rule as adaptive_rule
    from nuggets_jax.scoring.adaptive.config import AdaptiveConfig, round_columns

    adaptive_config = AdaptiveConfig.from_mapping(config.adaptive)
    # Round layouts: for an adaptive run, and for completing one (its partial candidates) into an exact run.
    partial = bool(store.names(adaptive.CHUNK_PREFIX))
    column_sets = round_columns(len(tasks.ids), adaptive_config) if adaptive_mode or partial else ()
    engine = scoring.Engine(
        loaded.model, tasks, scoring.prefix_lengths_of(prefixes), engine_config, log=log, column_sets=column_sets
    )
    timings["compile_s"] = engine.compile_s
    candidate_ids = [r.id for r in inputs.pool]
    task_ids = [r.id for r in inputs.tasks]
    compiles = _CompileCounter()

    if store.has("zero"):
        zero = store.read("zero")
        zero_logp, zero_correct, zero_stats = zero["zero_logp"], zero["zero_correct"], scoring.PassStats()
    else:
        zero_logp, zero_correct, zero_stats = engine.zero_shot(prefixes.zero_shot)
        one_shot.check_finite(zero_logp[None], ["<zero-shot>"], task_ids)
        store.write("zero", zero_logp=zero_logp, zero_correct=zero_correct)
    timings["zero_shot_s"] = zero_stats.wall_s
    shared = dict(chunk_candidates=config.scoring.chunk_candidates, progress=config.progress, log=log)
    if adaptive_mode:
        rule = adaptive_rule.target_rule(len(candidate_ids), **selection_rule(config))
        one = adaptive.run_adaptive(
            engine,
            prefixes,
            store,
            candidate_ids,
            task_ids,
            zero_logp,
            zero_correct,
            tasks.n_tokens,
            config.metric,
            rule,
            adaptive_config,
            **shared,
        )
    else:
        completed = scoring.PassStats()
        if partial:
            completed = adaptive.complete(engine, prefixes, store, candidate_ids, task_ids, adaptive_config, **shared)
        one = one_shot.run_one_shot(engine, prefixes, store, candidate_ids, task_ids, **shared)
        for field in ("wall_s", "calls", "pairs", "task_tokens", "scored_tokens", "flops"):
            setattr(one.stats, field, getattr(one.stats, field) + getattr(completed, field))
    timings["one_shot_s"] = one.stats.wall_s

    t0 = time.perf_counter()
    scores = {
        "zero_logp": zero_logp.astype(np.float32),
        "zero_correct": zero_correct.astype(np.int32),
        "n_tokens": tasks.n_tokens.astype(np.int32),
        "one_logp": one.one_logp,
        "one_correct": one.one_correct,
        "candidate_ids": np.asarray(candidate_ids),
        "task_ids": np.asarray(task_ids),
    }
    run: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if _is_main():
        store_lib.write_npz(workdir / "scores.npz", scores)
        records = [{**r.raw, "id": r.raw.get("id", r.position)} for r in inputs.pool]
        if adaptive_mode:
            # Golden set, ranking and intervals from the decisions (scores.npz has NaN for pairs never scored).
            extra = adaptive.write_outputs(workdir, records, one.decisions, config.metric, adaptive_config, rule)
            selected = one.decisions.selected
        else:
            values = metrics_lib.compute_all(scores)
            select_lib.write_ranking(workdir / "ranking.jsonl", records, values, config.metric)
            selected = select_lib.select(values[config.metric], **selection_rule(config))
            select_lib.write_golden(workdir / "golden.json", records, selected, values, config.metric)
    timings["write_s"] = time.perf_counter() - t0
    total_s = time.perf_counter() - t_start
    passes = [zero_stats, one.stats]
    busy = sum(p.wall_s for p in passes)
    run = {
        "devices": {
            "count": jax.device_count(),
            "platform": jax.default_backend(),
            "kind": jax.devices()[0].device_kind,
            "processes": jax.process_count(),
            "host": platform.node(),
        },
        "model": {
            "path": str(config.model.path),
            "dir": str(loaded.model_dir),
            "dtype": config.model.dtype,
            "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(engine.state))),
        },
        "counts": {
            "candidates": len(candidate_ids),
            "tasks": len(task_ids),
            "pairs": len(candidate_ids) * len(task_ids),
            "selected": int(len(selected)) if _is_main() else None,
        },
        "timings": timings,
        "zero_shot": zero_stats.as_dict(),
        "one_shot": one.stats.as_dict(),
        # Throughput of what this invocation computed (a resumed run counts only its own work).
        "tokens_per_s": sum(p.task_tokens for p in passes) / max(busy, 1e-9),
        "pairs_per_s": sum(p.pairs for p in passes) / max(busy, 1e-9),
        "flops_per_s": sum(p.flops for p in passes) / max(busy, 1e-9),
        "wall_s": total_s,
        "programs_compiled": engine.programs,
        "compiles_after_warmup": compiles.count,
        "buckets": {
            "prefix": engine.buckets,
            "row_length": engine.row_length,
            "rows_per_group": engine.rows_per_group,
            "groups": len(engine.layout.groups),
            "fill": engine.layout.fill,
            "candidates_per_call": engine.slots,
        },
        "cuts": {
            "candidates_cut": int(prefixes.cut.sum()),
            "tasks_cut": int(tasks.cut.sum()),
            "max_prefix_tokens": policy.max_prefix_tokens,
            "max_task_tokens": policy.max_task_tokens,
        },
        "resumed_candidates": one.resumed_candidates,
        "selection": selection_rule(config),
        "mode": config.scoring.mode,
        **extra,  # adaptive: pairs_scored, pairs_exact, compute_fraction, adaptive
        "jax": jax.__version__,
    }
    compiles.close()
    if _is_main():
        store_lib.atomic_write_bytes(workdir / "run.json", json.dumps(run, indent=2).encode())
        if config.report:
            from nuggets_jax.scoring import report as report

            report.write_report(workdir, records=records, metric=config.metric)
    return run


class _CompileCounter:
    """Counts XLA compilations from now on (the scoring loop must cause none)."""

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.count = 0
        self._active = True

        def listener(event: str, duration: float, **kwargs) -> None:
            if self._active and event == self._EVENT:
                self.count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)

    def close(self) -> None:
        self._active = False
