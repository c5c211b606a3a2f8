"""Task-set sweeps: build every task set, score the union once, evaluate variants as column subsets.

A variant is (task-set construction, K, M, seed, n_init, metric). The runner builds (or reuses)
every task set of the sweep from one source with the scoring model, writes the union of their
tasks (deduplicated by pool id) as one task file, runs the scoring job once on it
(`job.run_score`, which resumes), then reads each variant's golden scores off `scores.npz` as a
column subset (`metrics.compute_metric(..., columns=...)`) and compares its ranking with a
reference (`stability`). Nothing is ever rescored per variant.

Workdir: `pool.json` (the sampled candidates, when `pool_sample` > 0), `tasksets/<name>.json` (+
provenance), `tasks_union.json`, `scoring/` (a scoring job's workdir), `stability.json` (every
number of the report), `report.md` and `plots/`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import metrics as metrics_lib
from nuggets_jax import sharding, synthetic
from nuggets_jax import store as store_lib
from nuggets_jax.errors import UserError
from nuggets_jax.scoring import job as job
from nuggets_jax.tasksets import build as taskset_lib
from nuggets_jax.tasksets import embedding as embedding
from nuggets_jax.tasksets import source as source_lib
from nuggets_jax.tasksets import stability as stability

# What a sweep may vary: anything else would need a second scoring run.
SWEEP_KEYS = ("metric", "taskset.construction", "taskset.k", "taskset.m", "taskset.seed", "taskset.n_init")
_NAME = re.compile(r"(kmeans|random)_k(\d+)_m(\d+)_s(\d+)")


class SweepError(UserError):
    """A sweep that cannot run as configured; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One evaluated cell of the sweep: a task set and the metric its ranking uses."""

    spec: taskset_lib.TaskSetSpec
    metric: str

    @property
    def name(self) -> str:
        return f"{self.spec.name}/{self.metric}"


def expand(config, overrides: Iterable[Mapping[str, Any]]) -> list[Variant]:
    """Applies each override dict (keys of `SWEEP_KEYS`) to the config's task set and metric.

    Raises:
      SweepError: a key that cannot vary in a sweep, a bad value, or a repeated variant.
    """
    base = {
        "metric": config.metric,
        **{f"taskset.{k}": config.taskset[k] for k in ("construction", "k", "m", "seed", "n_init")},
    }
    variants: list[Variant] = []
    for i, override in enumerate(overrides):
        if not isinstance(override, Mapping):
            raise SweepError(f"sweep item {i}: expected a dict of overrides, got {type(override).__name__}.")
        bad = [key for key in override if key not in SWEEP_KEYS]
        if bad:
            raise SweepError(
                f"sweep item {i} {dict(override)}: {', '.join(map(repr, bad))} cannot vary in a sweep (it scores "
                f"once); vary only {', '.join(SWEEP_KEYS)}, and set everything else in the config."
            )
        values = {**base, **override}
        spec = taskset_lib.TaskSetSpec(**{k.removeprefix("taskset."): v for k, v in values.items() if k != "metric"})
        try:
            spec.check()
        except source_lib.TaskSetError as e:
            raise SweepError(f"sweep item {i} {dict(override)}: {e}") from None
        if values["metric"] not in metrics_lib.METRICS:
            raise SweepError(
                f"sweep item {i} {dict(override)}: unknown metric {values['metric']!r}; "
                f"choose one of: {', '.join(metrics_lib.METRICS)}."
            )
        variant = Variant(spec, values["metric"])
        if variant in variants:
            raise SweepError(f"sweep item {i} {dict(override)}: variant {variant.name} appears twice.")
        variants.append(variant)
    if not variants:
        raise SweepError("the sweep is empty: its sweep function yielded no override.")
    return variants


def reference_specs(config, variants: list[Variant]) -> dict[str, taskset_lib.TaskSetSpec | None]:
    """The reference task set of each metric (None = every column of the union).

    `config.reference`: "largest" = the variant of `config.reference_construction` with the
    largest K and then the lowest seed, with the same metric; "union"; or a task-set name such as
    "kmeans_k100_m1000_s0" (built even when it is not a variant).
    """
    metrics = list(dict.fromkeys(v.metric for v in variants))
    choice = config.reference
    if choice == "union":
        return dict.fromkeys(metrics)
    if choice == "largest":
        out = {}
        for metric in metrics:
            pool = [
                v.spec for v in variants if v.metric == metric and v.spec.construction == config.reference_construction
            ]
            if not pool:
                raise SweepError(
                    f"reference=largest: no {config.reference_construction} variant uses metric {metric!r}; add one, "
                    "set reference_construction, or set reference=union or a task-set name."
                )
            out[metric] = min(pool, key=lambda s: (-s.k, s.seed, s.m))
        return out
    match = _NAME.fullmatch(choice)
    if not match:
        raise SweepError(
            f"unknown reference {choice!r}; use 'largest', 'union' or a task-set name like 'kmeans_k100_m1000_s0'."
        )
    kind, k, m, seed = match.groups()
    spec = taskset_lib.TaskSetSpec(kind, int(k), int(m), int(seed), config.taskset.n_init)
    spec.check()
    return dict.fromkeys(metrics, spec)


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _write_json(path: pathlib.Path, obj: Any) -> None:
    if _is_main():
        text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=True) + "\n"
        store_lib.atomic_write_bytes(path, text.encode("utf-8"))


def _resolve_pool(config, score, workdir: pathlib.Path, log) -> tuple[list[data_lib.Record], str]:
    """The candidates the job will score; with `pool_sample` > 0 a seeded sample written to pool.json."""
    spec = score.data.pool
    if spec == "default":
        objects = synthetic.generate_pool()
        where = "<generated pool: nuggets_jax.synthetic.generate_pool()>"
        records = data_lib.records_from_objects([(f"{where}[{i}]", o) for i, o in enumerate(objects)], where, "pool")
    else:
        records, skipped = source_lib.read_valid_records(pathlib.Path(spec).expanduser(), "pool")
        if skipped and config.pool_sample:
            log(f"{spec}: skipped {len(skipped)} record(s) that cannot be candidates, e.g. {skipped[0]}")
    if config.pool_sample > 0:
        if config.pool_sample > len(records):
            raise SweepError(f"{spec}: pool_sample={config.pool_sample} but the pool has {len(records)} valid records.")
        picks = np.sort(np.random.default_rng(config.pool_seed).choice(len(records), config.pool_sample, replace=False))
        records = [records[i] for i in picks]
        path = workdir / "pool.json"
        _write_json(path, [r.raw for r in records])
        score.data.pool = str(path)
        log(f"pool: {len(records)} candidates sampled (seed {config.pool_seed}) from {spec} -> {path}")
    elif score.data.max_candidates:
        records = records[: score.data.max_candidates]
    return records, (f"sampled pool of {spec}" if config.pool_sample > 0 else str(spec))


def _score_config(config):
    """The scoring job's config: config.score with the pool and task file the sweep decides."""
    score = copy.deepcopy(config.score)
    score.unlock()
    score.metric = config.metric
    score.data.max_tasks = 0
    return score


def run_sweep(
    config, overrides: Iterable[Mapping[str, Any]], workdir: str | pathlib.Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs the whole sweep (see the module docstring) and returns stability.json's content."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    variants = expand(config, overrides)
    references = reference_specs(config, variants)
    score = _score_config(config)
    job.validate(score)
    fractions = tuple(float(f) for f in config.top_fractions)
    sharding.initialize(sharding.DistributedConfig(**score.distributed.to_dict()))
    workdir = pathlib.Path(workdir).expanduser()
    (workdir / "tasksets").mkdir(parents=True, exist_ok=True)

    pool, pool_label = _resolve_pool(config, score, workdir, log)
    source_spec = config.taskset.source
    if source_spec == "pool":
        if config.score.data.pool == "default":
            raise SweepError("taskset.source=pool needs score.data.pool to be a file; or use taskset.source=default.")
        source_spec = config.score.data.pool
    exclude = pool if config.taskset.exclude_pool else None
    if config.taskset.exclude:
        extra = data_lib.read_records(pathlib.Path(config.taskset.exclude).expanduser(), "taskset.exclude")
        exclude = [*(exclude or []), *extra]
        pool_label += f" + {config.taskset.exclude}"
    try:
        source = source_lib.load_source(source_spec, exclude, exclude_label=pool_label, log=log)
    except source_lib.TaskSetError as e:
        raise SweepError(
            f"{e} Sample the candidates (pool_sample=N) so tasks come from the rest of the file."
        ) from None
    template = data_lib.Template.from_config(score.data)
    policy = job.token_policy(score)
    tokenizer = source_lib.load_tokenizer(score.model.path)
    eligible = [source.records[i] for i in source.eligible]
    fits = source_lib.prompt_fits(tokenizer, eligible, template, policy.max_task_tokens)
    if not fits.all():
        source = source_lib.restrict(
            source, fits, f"prompt shorter than score.data.max_task_tokens={policy.max_task_tokens} tokens"
        )
        log(f"task source: {int((~fits).sum())} example(s) left out, their prompt fills the task cut")
    builder = taskset_lib.TaskSetBuilder(
        source,
        score.model.path,
        score.model.dtype,
        template,
        embedding.EmbeddingConfig(**config.taskset.embedding.to_dict()),
        log=log,
    )

    t0 = time.perf_counter()
    specs = list(dict.fromkeys([*(v.spec for v in variants), *(s for s in references.values() if s is not None)]))
    tasksets: dict[taskset_lib.TaskSetSpec, taskset_lib.TaskSet] = {}
    for spec in specs:
        path = workdir / "tasksets" / f"{spec.name}.json"
        tasksets[spec], reused = taskset_lib.build_or_reuse(builder, spec, path, write=_is_main())
        log(f"task set {spec.name}: {'reused' if reused else 'built'} ({len(tasksets[spec].records)} tasks)")
    timings["tasksets_s"] = time.perf_counter() - t0
    timings["embed_s"] = builder.embed_s
    builder = None  # frees the embedding model before the scoring job loads its own copy

    # The union, in source order, each record once, with its own fields and its pool id.
    by_id = {r.id: r for r in source.records}
    union_ids = sorted({pid for ts in tasksets.values() for pid in ts.pool_ids}, key=lambda i: by_id[i].position)
    union_records = [by_id[i] for i in union_ids]
    union_path = workdir / "tasks_union.json"
    _write_json(union_path, [{**r.raw, taskset_lib.TASKSET_FIELD: {"pool_id": r.id}} for r in union_records])
    if len(union_ids) > score.data.task_set_limit:
        raise SweepError(
            f"the sweep's union holds {len(union_ids)} tasks, more than score.data.task_set_limit="
            f"{score.data.task_set_limit}; raise --config.score.data.task_set_limit or sweep fewer task sets."
        )
    score.data.tasks = str(union_path)
    tasks = data_lib.tokenize_tasks(tokenizer, union_records, template, policy, str(union_path))
    lengths = np.asarray([len(ids) for ids in tasks.ids], np.int64)  # [U] task tokens per candidate
    index = {pid: i for i, pid in enumerate(union_ids)}
    columns = {spec: np.asarray([index[p] for p in ts.pool_ids], np.int64) for spec, ts in tasksets.items()}

    num_candidates = len(pool)
    per_variant = sum(len(columns[v.spec]) for v in variants)
    per_set = sum(len(c) for c in columns.values())
    log(
        f"sweep: {len(variants)} variants over {len(tasksets)} task sets; scoring the union of {len(union_ids)} task "
        f"columns once for {num_candidates} candidates, instead of {per_variant} columns summed over variants "
        f"({per_set} over distinct task sets, {per_set / len(union_ids):.2f}x the union)"
    )

    t0 = time.perf_counter()
    scores, reused = _score_once(score, workdir, log)
    timings["scoring_s"] = time.perf_counter() - t0
    task_ids = [str(t) for t in scores["task_ids"]]
    expected = [r.id for r in data_lib.read_records(union_path, "tasks")]
    if task_ids != expected:
        raise SweepError(f"{workdir / 'scoring'}/scores.npz: its task columns are not {union_path}; rerun with fresh.")
    num_candidates = int(scores["one_logp"].shape[0])

    t0 = time.perf_counter()
    reference_values = {
        metric: metrics_lib.compute_metric(metric, scores, None if spec is None else columns[spec])
        for metric, spec in references.items()
    }
    reference_cost = {
        metric: stability.task_cost(
            lengths, np.arange(len(union_ids)) if spec is None else columns[spec], num_candidates
        )
        for metric, spec in references.items()
    }
    reference_ids = {m: None if s is None else set(tasksets[s].pool_ids) for m, s in references.items()}
    rows = []
    for v in variants:
        values = metrics_lib.compute_metric(v.metric, scores, columns[v.spec])
        cost = stability.task_cost(lengths, columns[v.spec], num_candidates)
        rows.append(
            {
                "variant": v.name,
                "taskset": v.spec.name,
                **dataclasses.asdict(v.spec),
                "metric": v.metric,
                "is_reference": references[v.metric] == v.spec,
                "tasks": int(len(columns[v.spec])),
                # Tasks also in the reference set: they pull the correlation up, so the table shows them.
                "shared_with_reference": len(tasksets[v.spec].pool_ids)
                if reference_ids[v.metric] is None
                else len(reference_ids[v.metric] & set(tasksets[v.spec].pool_ids)),
                "task_tokens": int(lengths[columns[v.spec]].sum()),
                "cost_tokens": cost,
                "cost_vs_reference": cost / max(reference_cost[v.metric], 1),
                **stability.compare(values, reference_values[v.metric], fractions),
            }
        )
    value_keys = ["spearman", "kendall", *(stability.fraction_label(f) for f in fractions)]
    plotted = [r for r in rows if not r["is_reference"]]
    summary = stability.summarize(plotted, ("construction", "k", "m", "n_init", "metric"), [*value_keys, "cost_tokens"])
    names, matrix = stability.correlation_matrix(metrics_lib.compute_all(scores))
    timings["evaluate_s"] = time.perf_counter() - t0
    timings["wall_s"] = time.perf_counter() - t_start
    result = {
        "variants": rows,
        "summary": summary,
        "reference": {
            m: {"taskset": "union" if s is None else s.name, "cost_tokens": reference_cost[m]}
            for m, s in references.items()
        },
        "metric_correlation": {"names": names, "matrix": matrix.tolist(), "columns": "union"},
        "counts": {
            "candidates": num_candidates,
            "variants": len(variants),
            "tasksets": len(tasksets),
            "union_columns": len(union_ids),
            "columns_summed_over_variants": per_variant,
            "columns_summed_over_tasksets": per_set,
            "union_task_tokens": int(lengths.sum()),
            "scored_task_tokens": int(lengths.sum()) * num_candidates,
        },
        "fractions": list(fractions),
        "source": {"path": source.path, "sha256": source.sha256, "eligible": int(len(source.eligible))},
        "exclude": source.exclude,
        "pool": score.data.pool,
        "scoring_workdir": str(workdir / "scoring"),
        # Candidates whose scores an earlier invocation computed (timings cover only this one).
        "scoring_reused_candidates": reused,
        "timings": timings,
    }
    if _is_main():
        _write_json(workdir / "stability.json", result)
        from nuggets_jax.tasksets import report as sweep_report

        sweep_report.write_sweep_report(workdir, result)
    return result


def _score_once(score, workdir: pathlib.Path, log) -> tuple[dict[str, np.ndarray], int]:
    """Runs the scoring job on the union unless this exact run has finished before.

    Returns:
      (scores.npz arrays, candidates scored by an earlier invocation).
    """
    scoring = workdir / "scoring"
    inputs = {
        "config": json.loads(score.to_json()),
        "pool_sha256": None if score.data.pool == "default" else source_lib.file_sha256(pathlib.Path(score.data.pool)),
        "tasks_sha256": source_lib.file_sha256(pathlib.Path(score.data.tasks)),
    }
    marker = workdir / "scoring_done.json"
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    done = marker.is_file() and json.loads(marker.read_text()).get("digest") == digest
    if done and (scoring / "scores.npz").is_file():
        log(f"scoring: {scoring} already holds the scores of this union; reusing scores.npz")
        reused = None
    else:
        try:
            run = job.run_score(score, scoring, log=log)
        except job.WorkdirMismatchError as e:
            raise SweepError(
                f"{e} (In a sweep: the union of task sets changed; add --config.score.fresh=True to rescore it, "
                "or use another --workdir.)"
            ) from None
        log(
            f"scoring: {run['counts']['pairs']} pairs in {run['wall_s']:.1f}s ({run['tokens_per_s']:.0f} task tokens/s)"
        )
        _write_json(marker, {"digest": digest, "inputs": inputs})
        reused = run["resumed_candidates"]
    with np.load(scoring / "scores.npz") as z:
        scores = {k: z[k] for k in z.files}
    return scores, int(scores["one_logp"].shape[0]) if reused is None else int(reused)
