"""Task-set sweeps: build every task set, score the union once, evaluate variants as column subsets.

A variant is (task-set construction, K, M, seed, n_init, metric); `sweep_spec` resolves the config
into the variants and their references once. `run_sweep` then runs named phases: it builds (or
reuses) every task set of the sweep from one source with the scoring model, writes the union of
their tasks (deduplicated by pool id) as one task file, runs the scoring job once on it
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
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import metrics as metrics_lib
from nuggets_jax import sharding, synthetic
from nuggets_jax import store as store_lib
from nuggets_jax.scoring import job as job
from nuggets_jax.tasksets import build as taskset_lib
from nuggets_jax.tasksets import report as report_lib
from nuggets_jax.tasksets import source as source_lib
from nuggets_jax.tasksets import stability as stability
from nuggets_jax.tasksets.sweep_spec import SweepError, SweepSpec, resolve_sweep


def _write_json(path: pathlib.Path, obj: Any) -> None:
    if sharding.is_main():
        text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=True) + "\n"
        store_lib.atomic_write_bytes(path, text.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class CandidatePool:
    """The candidates the scoring job scores: `records`, the file it reads and how reports name it."""

    records: list[data_lib.Record]
    file: str  # score.data.pool of the scoring job: the config's, or the sampled pool.json
    label: str


def _candidate_pool(spec: SweepSpec, workdir: pathlib.Path, log) -> CandidatePool:
    """The candidates the job will score; with `pool_sample` > 0 a seeded sample written to pool.json."""
    data = spec.score.data
    if data.pool == "default":
        objects = synthetic.generate_pool()
        where = "<generated pool: nuggets_jax.synthetic.generate_pool()>"
        records = data_lib.records_from_objects([(f"{where}[{i}]", o) for i, o in enumerate(objects)], where, "pool")
    else:
        records, skipped = source_lib.read_valid_records(
            pathlib.Path(data.pool).expanduser(), "pool", "score.data.pool"
        )
        if skipped and spec.pool_sample:
            log(f"{data.pool}: skipped {len(skipped)} record(s) that cannot be candidates, e.g. {skipped[0]}")
    if spec.pool_sample > 0:
        if spec.pool_sample > len(records):
            raise SweepError(
                f"{data.pool}: pool_sample={spec.pool_sample} but the pool has {len(records)} valid records."
            )
        picks = np.sort(np.random.default_rng(spec.pool_seed).choice(len(records), spec.pool_sample, replace=False))
        records = [records[i] for i in picks]
        path = workdir / "pool.json"
        _write_json(path, [r.raw for r in records])
        log(f"pool: {len(records)} candidates sampled (seed {spec.pool_seed}) from {data.pool} -> {path}")
        return CandidatePool(records, str(path), f"sampled pool of {data.pool}")
    if data.max_candidates:
        records = records[: data.max_candidates]
    return CandidatePool(records, data.pool, str(data.pool))


def _task_source(spec: SweepSpec, pool: CandidatePool, tokenizer, log) -> source_lib.Source:
    """The task source without the pool (and `taskset.exclude`), restricted to prompts the job can score."""
    exclude = pool.records if spec.exclude_pool else None
    exclude_label = pool.label
    if spec.exclude:
        extra = data_lib.read_records(pathlib.Path(spec.exclude).expanduser(), "taskset.exclude")
        exclude = [*(exclude or []), *extra]
        exclude_label += f" + {spec.exclude}"
    try:
        source = source_lib.load_source(spec.task_source, exclude, exclude_label=exclude_label, log=log)
    except source_lib.TaskSetError as e:
        raise SweepError(
            f"{e} Sample the candidates (pool_sample=N) so tasks come from the rest of the file."
        ) from None
    cut = spec.policy.max_task_tokens
    fits = source_lib.prompt_fits(tokenizer, [source.records[i] for i in source.eligible], spec.template, cut)
    if not fits.all():
        source = source_lib.restrict(source, fits, f"prompt shorter than score.data.max_task_tokens={cut} tokens")
        log(f"task source: {int((~fits).sum())} example(s) left out, their prompt fills the task cut")
    return source


def _build_tasksets(
    spec: SweepSpec, source: source_lib.Source, workdir: pathlib.Path, log
) -> tuple[dict[taskset_lib.TaskSetSpec, taskset_lib.TaskSet], float]:
    """Builds (or reuses from `tasksets/`) every task set of the sweep; returns them and the embedding time."""
    builder = taskset_lib.TaskSetBuilder(
        source, spec.score.model.path, spec.score.model.dtype, spec.template, spec.embedding, log=log
    )
    tasksets: dict[taskset_lib.TaskSetSpec, taskset_lib.TaskSet] = {}
    for wanted in spec.tasksets:
        path = workdir / "tasksets" / f"{wanted.name}.json"
        tasksets[wanted], reused = taskset_lib.build_or_reuse(builder, wanted, path, write=sharding.is_main())
        log(f"task set {wanted.name}: {'reused' if reused else 'built'} ({len(tasksets[wanted].records)} tasks)")
    # Returning only the time lets the embedding model go before the scoring job loads its own copy.
    return tasksets, builder.embed_s


@dataclasses.dataclass(frozen=True)
class TaskUnion:
    """Every task of the sweep once, in source order: the one task file the scoring job scores.

    Attributes:
      ids: [U] pool ids of the union's tasks (its columns).
      path: `tasks_union.json`.
      lengths: [U] task tokens of each column after the cut.
      columns: each task set's columns of the union.
    """

    ids: list[str]
    path: pathlib.Path
    lengths: np.ndarray
    columns: dict[taskset_lib.TaskSetSpec, np.ndarray]


def _write_union(
    spec: SweepSpec,
    source: source_lib.Source,
    tasksets: Mapping[taskset_lib.TaskSetSpec, taskset_lib.TaskSet],
    tokenizer,
    workdir: pathlib.Path,
) -> TaskUnion:
    """Writes `tasks_union.json` (each record with its own fields and its pool id) and its columns."""
    by_id = {r.id: r for r in source.records}
    ids = sorted({pid for ts in tasksets.values() for pid in ts.pool_ids}, key=lambda i: by_id[i].position)
    records = [by_id[i] for i in ids]
    path = workdir / "tasks_union.json"
    _write_json(path, [{**r.raw, taskset_lib.TASKSET_FIELD: {"pool_id": r.id}} for r in records])
    limit = spec.score.data.task_set_limit
    if len(ids) > limit:
        raise SweepError(
            f"the sweep's union holds {len(ids)} tasks, more than score.data.task_set_limit={limit}; "
            "raise --config.score.data.task_set_limit or sweep fewer task sets."
        )
    tasks = data_lib.tokenize_tasks(tokenizer, records, spec.template, spec.policy, str(path))
    index = {pid: i for i, pid in enumerate(ids)}
    return TaskUnion(
        ids=ids,
        path=path,
        lengths=np.asarray([len(t) for t in tasks.ids], np.int64),
        columns={s: np.asarray([index[p] for p in ts.pool_ids], np.int64) for s, ts in tasksets.items()},
    )


def _column_counts(spec: SweepSpec, union: TaskUnion) -> dict[str, int]:
    """Task columns of the union against those the variants (and the distinct task sets) would sum to."""
    return {
        "union_columns": len(union.ids),
        "columns_summed_over_variants": sum(len(union.columns[v.spec]) for v in spec.variants),
        "columns_summed_over_tasksets": sum(len(c) for c in union.columns.values()),
    }


def _score_union(
    spec: SweepSpec, pool: CandidatePool, union: TaskUnion, workdir: pathlib.Path, log
) -> tuple[dict[str, np.ndarray], int]:
    """The scoring job run once on the pool and the union (`_score_once`); its scores.npz arrays."""
    score = copy.deepcopy(spec.score)
    score.data.pool = pool.file
    score.data.tasks = str(union.path)
    scores, reused = _score_once(score, workdir, log)
    expected = [r.id for r in data_lib.read_records(union.path, "tasks")]
    if [str(t) for t in scores["task_ids"]] != expected:
        raise SweepError(f"{workdir / 'scoring'}/scores.npz: its task columns are not {union.path}; rerun with fresh.")
    return scores, reused


def _evaluate(
    spec: SweepSpec,
    tasksets: Mapping[taskset_lib.TaskSetSpec, taskset_lib.TaskSet],
    union: TaskUnion,
    scores: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """Each variant's ranking (a column subset of the union's scores) against its reference's.

    Returns:
      stability.json's "variants" (one row each), "summary" (over seeds), "reference" and
      "metric_correlation" (between metrics, on every column of the union).
    """
    num_candidates = int(scores["one_logp"].shape[0])
    every_column = np.arange(len(union.ids))
    reference_values, reference_cost, reference_ids = {}, {}, {}
    for metric, reference in spec.references.items():
        columns = None if reference is None else union.columns[reference]
        reference_values[metric] = metrics_lib.compute_metric(metric, scores, columns)
        reference_cost[metric] = stability.task_cost(
            union.lengths, every_column if columns is None else columns, num_candidates
        )
        reference_ids[metric] = None if reference is None else set(tasksets[reference].pool_ids)
    rows = []
    for v in spec.variants:
        columns = union.columns[v.spec]
        values = metrics_lib.compute_metric(v.metric, scores, columns)
        cost = stability.task_cost(union.lengths, columns, num_candidates)
        shared = reference_ids[v.metric]
        rows.append(
            {
                "variant": v.name,
                "taskset": v.spec.name,
                **dataclasses.asdict(v.spec),
                "metric": v.metric,
                "is_reference": spec.references[v.metric] == v.spec,
                "tasks": int(len(columns)),
                # Tasks also in the reference set: they pull the correlation up, so the table shows them.
                "shared_with_reference": len(tasksets[v.spec].pool_ids)
                if shared is None
                else len(shared & set(tasksets[v.spec].pool_ids)),
                "task_tokens": int(union.lengths[columns].sum()),
                "cost_tokens": cost,
                "cost_vs_reference": cost / max(reference_cost[v.metric], 1),
                **stability.compare(values, reference_values[v.metric], spec.fractions),
            }
        )
    value_keys = ["spearman", "kendall", *(stability.fraction_label(f) for f in spec.fractions)]
    plotted = [r for r in rows if not r["is_reference"]]
    summary = stability.summarize(plotted, ("construction", "k", "m", "n_init", "metric"), [*value_keys, "cost_tokens"])
    names, matrix = stability.correlation_matrix(metrics_lib.compute_all(scores))
    return {
        "variants": rows,
        "summary": summary,
        "reference": {
            m: {"taskset": "union" if s is None else s.name, "cost_tokens": reference_cost[m]}
            for m, s in spec.references.items()
        },
        "metric_correlation": {"names": names, "matrix": matrix.tolist(), "columns": "union"},
    }


def run_sweep(
    config, overrides: Iterable[Mapping[str, Any]], workdir: str | pathlib.Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs the whole sweep (see the module docstring) and returns stability.json's content."""
    t_start = time.perf_counter()
    spec = resolve_sweep(config, overrides)
    sharding.initialize(sharding.DistributedConfig(**spec.score.distributed.to_dict()))
    workdir = pathlib.Path(workdir).expanduser()
    (workdir / "tasksets").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # Task sets: the pool, the task source without it, every task set of the sweep.
    pool = _candidate_pool(spec, workdir, log)
    tokenizer = source_lib.load_tokenizer(spec.score.model.path)
    # data.template=chat: the model's chat template, resolved once for every stage below.
    spec = dataclasses.replace(
        spec, template=spec.template or data_lib.ChatTemplate.of(tokenizer, spec.score.model.path)
    )
    source = _task_source(spec, pool, tokenizer, log)
    t0 = time.perf_counter()
    tasksets, embed_s = _build_tasksets(spec, source, workdir, log)
    timings["tasksets_s"], timings["embed_s"] = time.perf_counter() - t0, embed_s

    # The union of their tasks, scored once.
    union = _write_union(spec, source, tasksets, tokenizer, workdir)
    columns = _column_counts(spec, union)
    per_variant, per_set = columns["columns_summed_over_variants"], columns["columns_summed_over_tasksets"]
    log(
        f"sweep: {len(spec.variants)} variants over {len(tasksets)} task sets; scoring the union of {len(union.ids)} "
        f"task columns once for {len(pool.records)} candidates, instead of {per_variant} columns summed over variants "
        f"({per_set} over distinct task sets, {per_set / len(union.ids):.2f}x the union)"
    )
    t0 = time.perf_counter()
    scores, reused = _score_union(spec, pool, union, workdir, log)
    timings["scoring_s"] = time.perf_counter() - t0

    # Every variant as a column subset of the union's scores.
    t0 = time.perf_counter()
    evaluation = _evaluate(spec, tasksets, union, scores)
    timings["evaluate_s"] = time.perf_counter() - t0
    timings["wall_s"] = time.perf_counter() - t_start

    # stability.json and the report.
    num_candidates = int(scores["one_logp"].shape[0])
    result = {
        **evaluation,
        "counts": {
            "candidates": num_candidates,
            "variants": len(spec.variants),
            "tasksets": len(tasksets),
            **columns,
            "union_task_tokens": int(union.lengths.sum()),
            "scored_task_tokens": int(union.lengths.sum()) * num_candidates,
        },
        "fractions": list(spec.fractions),
        "source": {"path": source.path, "sha256": source.sha256, "eligible": int(len(source.eligible))},
        "exclude": source.exclude,
        "pool": pool.file,
        "scoring_workdir": str(workdir / "scoring"),
        # Candidates whose scores an earlier invocation computed (timings cover only this one).
        "scoring_reused_candidates": reused,
        "timings": timings,
    }
    if sharding.is_main():
        _write_json(workdir / "stability.json", result)
        report_lib.write_sweep_report(workdir, result)
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
