"""What the selection buys: fine-tune on golden top-k, random-k (several seeds) and the full pool at
equal training steps, then evaluate every model and the base model on one held-out set.

Inputs come from a scoring run (its workdir: config.json, ranking.jsonl, golden.json), or the
scoring job runs first into `WORKDIR/scoring`. Outputs in WORKDIR: `runs/<variant>/` (checkpoints,
train_log.jsonl, eval.json), `results.json`, `report.md` with the table and `plots/` (written by
`finetune.report` from results.json's content). Everything resumes: a finished variant is not
retrained and its evaluation is reused.

`run_comparison` resolves the config and the scoring run once into a `ComparisonSpec`, then runs
named phases: the base model and the held-out set (`HeldOut`), each variant trained and evaluated,
results.json and the report.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from nuggets_jax import data as data_lib
from nuggets_jax import select as select_lib
from nuggets_jax import sharding, synthetic
from nuggets_jax import store as store_lib
from nuggets_jax.errors import UserError
from nuggets_jax.finetune import data as finetune_data
from nuggets_jax.finetune import evaluate as evaluate
from nuggets_jax.finetune import report as report_lib
from nuggets_jax.finetune import step as finetune_step
from nuggets_jax.finetune import train as finetune
from nuggets_jax.metrics import METRICS
from nuggets_jax.scoring import job as job

VARIANTS = ("golden", "random", "full")


class CompareError(UserError):
    """A comparison config that cannot run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training subset: `indices` into the pool."""

    name: str
    kind: str  # golden | random | full
    indices: np.ndarray
    seed: int | None = None


def choose_variants(values: np.ndarray, top_k: int, kinds: Sequence[str], random_seeds: Sequence[int]) -> list[Variant]:
    """Golden = top_k by `values` (rank order, NaN never chosen), random-k per seed, full = all."""
    n = values.size
    if not 1 <= top_k <= n:
        raise CompareError(f"top_k={top_k} must be in [1, {n}] (the pool has {n} records).")
    unknown = sorted(set(kinds) - set(VARIANTS))
    if unknown or not kinds:
        raise CompareError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}.")
    out = []
    for kind in kinds:
        if kind == "golden":
            out.append(Variant("golden", kind, select_lib.select(values, top_n=top_k)))
        elif kind == "random":
            if not random_seeds:
                raise CompareError("variant 'random' needs at least one seed in random_seeds.")
            for seed in random_seeds:
                chosen = np.sort(np.random.default_rng(seed).choice(n, size=top_k, replace=False))
                out.append(Variant(f"random_s{seed}", kind, chosen, int(seed)))
        else:
            out.append(Variant("full", kind, np.arange(n)))
    return out


def default_eval_set(size: int, seed: int, exclude: Sequence[data_lib.Record]) -> list[data_lib.Record]:
    """Generated held-out tasks (`synthetic.generate_tasks(size, seed)`), disjoint from the pool by
    construction; repeated questions and those of `exclude` (the scoring task set) are dropped."""
    seen = {(r.instruction, r.input) for r in exclude}
    objects = []
    for i, obj in enumerate(synthetic.generate_tasks(size, seed)):
        key = (obj["instruction"].strip(), (obj["input"] or "").strip())
        if key not in seen:
            seen.add(key)
            objects.append((f"<generated eval set seed {seed}>[{i}]", obj))
    return data_lib.records_from_objects(objects, f"<generated eval set: {size} tasks, seed {seed}>", "eval")


def _scoring_run(config, workdir: pathlib.Path, log) -> pathlib.Path:
    if config.scoring_workdir:
        sdir = pathlib.Path(config.scoring_workdir).expanduser()
        missing = [n for n in ("config.json", "ranking.jsonl") if not (sdir / n).is_file()]
        if not any((sdir / n).exists() for n in select_lib.GOLDEN_NAMES):
            missing.append("golden.json (or golden.jsonl, golden.parquet, golden/)")
        if missing:
            raise CompareError(
                f"{sdir}: not a finished scoring run (missing {', '.join(missing)}); run experiments.score "
                "there first, or leave scoring_workdir empty to score into WORKDIR/scoring."
            )
        return sdir
    sdir = workdir / "scoring"
    log(f"compare: no scoring_workdir given; scoring the pool into {sdir}")
    job.run_score(config.score, sdir, log)
    return sdir


def ranking_values(path: pathlib.Path, pool: Sequence[data_lib.Record], metric: str) -> np.ndarray:
    by_id = {str(entry["id"]): entry for entry in select_lib.read_ranking(path)}
    missing = [r.id for r in pool if r.id not in by_id]
    if missing:
        raise CompareError(f"{path}: has no line for pool ids {missing[:5]}; it belongs to another pool.")
    values = [by_id[r.id].get(metric) for r in pool]
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cached_eval(
    path: pathlib.Path, key: dict, compute: Callable[[], evaluate.EvalResult]
) -> tuple[evaluate.EvalResult, float]:
    """The evaluation saved at `path` if its key matches, else computed and saved; and its time in seconds."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key and "seconds" in saved:
            result = evaluate.EvalResult(np.asarray(saved["logp"], np.float32), np.asarray(saved["n_tokens"], np.int32))
            return result, saved["seconds"]
    t0 = time.perf_counter()
    result = compute()
    seconds = time.perf_counter() - t0
    payload = {"key": key, "logp": result.logp.tolist(), "n_tokens": result.n_tokens.tolist(), "seconds": seconds}
    store_lib.atomic_write_bytes(path, json.dumps(payload).encode())
    return result, seconds


@dataclasses.dataclass(frozen=True)
class ComparisonSpec:
    """The comparison resolved once from its config and the scoring run, validated.

    Attributes:
      workdir: where runs/, results.json and report.md go.
      train: the training run every variant shares (validated).
      scoring_workdir: the scoring run whose ranking picks the golden set.
      inputs: the scoring run's pool and task set.
      metric: the ranking metric (config.metric, or the scoring run's).
      top_k: the golden and random subset size (config.top_k, or the size of golden.json).
      variants: the training subsets.
      template: the scoring run's text template (training and evaluation use it too); None for
        `data.template=chat`: the tokenizer's chat template (`template_of`)
      model_path: the model fine-tuned (config.model.path, or the scoring run's).
      fresh: retrain a variant whose run directory holds a different run.
      progress: show a progress bar while training.
      mesh_model: the model-parallel degree of the training and evaluation mesh (`mesh.model`).
    """

    workdir: pathlib.Path
    train: finetune_step.TrainConfig
    scoring_workdir: pathlib.Path
    inputs: job.Inputs
    metric: str
    top_k: int
    variants: tuple[Variant, ...]
    template: data_lib.Template | None
    model_path: str
    fresh: bool
    progress: bool
    mesh_model: int = 1


def template_of(spec: ComparisonSpec, tokenizer):
    """The scoring run's template: its text template, or the tokenizer's chat template."""
    return spec.template or data_lib.ChatTemplate.of(tokenizer, spec.model_path)


def resolve_comparison(
    config: ml_collections.ConfigDict,
    train: finetune_step.TrainConfig,
    workdir: pathlib.Path,
    scoring_workdir: pathlib.Path,
) -> ComparisonSpec:
    """Reads the scoring run and checks the comparison config against it.

    Args:
      config: the comparison config.
      train: `config.train`, validated.
      workdir: the comparison's workdir.
      scoring_workdir: a finished scoring run.

    Raises:
      CompareError, FinetuneError: naming the field to change.
    """
    score_config = ml_collections.ConfigDict(json.loads((scoring_workdir / "config.json").read_text()))
    inputs = job.load_inputs(score_config, scoring_workdir)
    metric = config.metric or score_config.metric
    if metric not in METRICS:
        raise CompareError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}.")
    top_k = config.top_k or len(select_lib.read_golden(select_lib.golden_path(scoring_workdir)))
    values = ranking_values(scoring_workdir / "ranking.jsonl", inputs.pool, metric)
    variants = choose_variants(values, top_k, list(config.variants), list(config.random_seeds))
    return ComparisonSpec(
        workdir=workdir,
        train=train,
        scoring_workdir=scoring_workdir,
        inputs=inputs,
        metric=metric,
        top_k=top_k,
        variants=tuple(variants),
        template=data_lib.Template.from_config(score_config.data)
        if job.data_form(score_config)["template"] == "text"
        else None,
        model_path=config.model.path or score_config.model.path,
        fresh=config.fresh,
        progress=config.progress,
        mesh_model=int(config.mesh.model) if "mesh" in config else 1,
    )


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The held-out set every model is evaluated on, and its evaluator.

    Attributes:
      records: the evaluation examples.
      source: how the report names them.
      pool_overlap: examples that repeat a pool example's instruction and input.
      evaluator: the base model's evaluator (compiled on first use; other parameter states reuse its
        programs).
      key: what a saved evaluation must match (model, dtype, the tokenized set).
      categories: each example's "category", when every example has one (else None).
    """

    records: list[data_lib.Record]
    source: str
    pool_overlap: int
    evaluator: evaluate.Evaluator
    key: dict[str, Any]
    categories: list[str] | None


def eval_records(eval_config, name: str, exclude: Sequence[data_lib.Record]) -> tuple[list[data_lib.Record], str]:
    """The records of evaluation set `name` ("default": generated, `default_eval_set`; else a file read
    by `evaluate.read_eval_set`) under `eval_config` (size, seed, format, max_examples), and its source."""
    if name == "default":
        records = default_eval_set(eval_config.size, eval_config.seed, exclude)
        source = f"generated: synthetic.generate_tasks({eval_config.size}, seed={eval_config.seed})"
        return records[: eval_config.max_examples or None], source
    empty: list[str] = []  # examples without a reference cannot be evaluated
    records = evaluate.read_eval_set(name, eval_config.format, eval_config.max_examples, empty)
    return records, str(name) + (f" ({len(empty)} example(s) with an empty reference left out)" if empty else "")


def _held_out(eval_config, spec: ComparisonSpec, loaded, model_fingerprint: str, log) -> HeldOut:
    """Reads (or generates) the evaluation set (`config.eval`) and compiles its evaluator on the base model."""
    records, source = eval_records(eval_config, eval_config.set, spec.inputs.tasks)
    return held_out_set(records, source, eval_config.max_tokens, spec, loaded, model_fingerprint, log)


def held_out_set(
    records: list[data_lib.Record], source: str, max_tokens: int, spec: ComparisonSpec, loaded, model_fingerprint, log
) -> HeldOut:
    """An evaluation set with its evaluator on the base model (examples cut at `max_tokens`)."""
    base_model = finetune_step.merge_params(loaded.model, nnx.split(loaded.model)[1], spec.train.dtype)
    template = template_of(spec, loaded.tokenizer)
    bos = spec.train.bos and template.kind == "text"  # a chat template writes its own special tokens
    evaluator = evaluate.Evaluator(
        base_model, loaded.tokenizer, records, template, max_tokens, bos,
        mesh=sharding.make_mesh(spec.mesh_model), log=log,
    )  # fmt: skip
    records = evaluator.records
    if evaluator.left_out:
        source += f" ({len(evaluator.left_out)} example(s) with no response token inside {max_tokens} tokens left out)"
    pool_keys = {(r.instruction, r.input) for r in spec.inputs.pool}
    overlap = sum((r.instruction, r.input) in pool_keys for r in records)
    if overlap:
        log(f"compare: warning: {overlap} eval example(s) repeat a pool example's instruction and input")
    key = {
        "model": model_fingerprint,
        "dtype": spec.train.dtype,
        "eval": _digest([[int(t) for t in ids] for ids in evaluator.tasks.ids]),
        "response_start": evaluator.tasks.response_start.tolist(),
    }
    categories = [r.raw.get("category") for r in records]
    return HeldOut(
        records, source, overlap, evaluator, key, categories if all(isinstance(c, str) for c in categories) else None
    )


def train_variant(spec: ComparisonSpec, variant: Variant, loaded, model_fingerprint: str, log):
    """Trains one variant (or resumes it) in WORKDIR/runs/<name>; the training result and its row fields."""
    pool = spec.inputs.pool
    subset = [pool[i] for i in variant.indices]
    template = template_of(spec, loaded.tokenizer)
    examples = finetune_data.tokenize_examples(
        loaded.tokenizer, subset, template, spec.train.max_tokens, spec.train.eos, spec.train.bos
    )
    run_dir = spec.workdir / "runs" / variant.name
    log(f"compare: training {variant.name} on {len(subset)} records")
    result = finetune.train(
        loaded.model,
        examples,
        spec.train,
        run_dir,
        loaded.hf_config,
        loaded.model_dir,
        mesh=sharding.make_mesh(spec.mesh_model),
        log=log,
        progress=spec.progress,
        fingerprint_extra={
            "model": model_fingerprint,
            "template": template.describe(),
        },
        fresh=spec.fresh,
    )
    corrupted = [r.raw.get("corruption") for r in subset]
    seen = sum(e["examples"] for e in result.log)
    fields = {
        "variant": variant.name,
        "kind": variant.kind,
        "seed": variant.seed,
        "records": len(subset),
        "clean_fraction": (
            float(np.mean([c is None for c in corrupted])) if all("corruption" in r.raw for r in subset) else None
        ),
        "steps": len(result.log),
        "train_tokens": int(sum(e["tokens"] for e in result.log)),
        "epochs": seen / len(subset),
        "final_train_loss": float(np.mean([e["loss"] for e in result.log[-5:]])),
    }
    return result, fields


def evaluate_variant(
    held_out: HeldOut, result, base: evaluate.EvalResult, path: pathlib.Path
) -> tuple[dict[str, Any], float]:
    """The trained model on one held-out set (or its saved evaluation at `path`): summary fields and seconds."""
    key = {**held_out.key, "params": str(result.final_checkpoint), "train": result.log[-1]}
    scores, eval_s = cached_eval(path, key, functools.partial(held_out.evaluator.evaluate, result.params))
    summary = {
        **scores.summary(base),
        "by_category": scores.by_group(held_out.categories) if held_out.categories else None,
    }
    return summary, eval_s


def training_fields(result) -> dict[str, Any]:
    """What a results row says about the training run, from its saved log (so a resumed comparison
    reports the run that trained it)."""
    return {
        "train_wall_s": float(sum(e["wall_s"] for e in result.log)),
        "tokens_per_s": sum(e["tokens"] for e in result.log) / max(1e-9, sum(e["wall_s"] for e in result.log)),
        "programs_compiled": result.programs,
        "checkpoint": str(result.final_checkpoint),
        "loss_curve": [e["loss"] for e in result.log],
    }


def _train_and_evaluate(
    spec: ComparisonSpec,
    variant: Variant,
    loaded,
    model_fingerprint: str,
    held_out: HeldOut,
    base: evaluate.EvalResult,
    log,
) -> dict[str, Any]:
    """Trains one variant (or resumes it), evaluates it (or reuses its evaluation); its results row."""
    result, fields = train_variant(spec, variant, loaded, model_fingerprint, log)
    summary, eval_s = evaluate_variant(held_out, result, base, spec.workdir / "runs" / variant.name / "eval.json")
    extra = training_fields(result)
    return {
        **fields,
        **summary,
        "train_wall_s": extra["train_wall_s"],
        "eval_s": eval_s,
        **{k: extra[k] for k in ("tokens_per_s", "programs_compiled", "checkpoint", "loss_curve")},
    }


def run_comparison(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, log=print) -> dict[str, Any]:
    """Trains and evaluates every variant; writes results.json, report.md and plots; returns the results."""
    from nuggets_jax import models

    t_start = time.perf_counter()
    if "distributed" in config:
        sharding.initialize(sharding.DistributedConfig(**config.distributed.to_dict()))
    workdir = pathlib.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    train = finetune_step.TrainConfig(**config.train.to_dict())
    train.validate()  # before a scoring job runs for a comparison that cannot train
    import jax

    train = train.resolved(jax.default_backend())  # dtype and remat by platform; FSDP decided per run

    # What to train: the scoring run's ranking picks the golden set.
    spec = resolve_comparison(config, train, workdir, _scoring_run(config, workdir, log))

    # The base model and the held-out set, evaluated once.
    # float32 master weights, each process reading only its slices (training casts to train.dtype).
    loaded = models.load_model(
        spec.model_path, dtype="float32", mesh=sharding.make_mesh(spec.mesh_model), replicate_kv=False
    )
    model_fingerprint = models.model_fingerprint(loaded.model_dir)
    held_out = _held_out(config.eval, spec, loaded, model_fingerprint, log)
    log(
        f"compare: {len(spec.inputs.pool)} pool records, top_k={spec.top_k} by {spec.metric}, "
        f"{len(held_out.records)} eval examples"
    )
    base, base_eval_s = cached_eval(
        workdir / "base_eval.json", {**held_out.key, "params": "base"}, held_out.evaluator.evaluate
    )

    # Every variant at equal steps: trained (or resumed), then evaluated.
    rows = [
        _train_and_evaluate(spec, variant, loaded, model_fingerprint, held_out, base, log) for variant in spec.variants
    ]

    # results.json and the report.
    results = {
        "scoring_workdir": str(spec.scoring_workdir),
        "metric": spec.metric,
        "top_k": spec.top_k,
        "pool": spec.inputs.pool_source,
        "pool_size": len(spec.inputs.pool),
        "model": str(loaded.model_dir),
        "eval": {
            "source": held_out.source,
            "examples": len(held_out.records),
            "response_tokens": int(held_out.evaluator.tasks.n_tokens.sum()),
            "max_tokens": config.eval.max_tokens,
            "pool_overlap": held_out.pool_overlap,
        },
        "base": {
            **base.summary(),
            "by_category": base.by_group(held_out.categories) if held_out.categories else None,
        },
        "base_eval_s": base_eval_s,
        "train": dataclasses.asdict(spec.train),
        "variants": rows,
        "random_summary": _random_summary(rows),
        "wall_s": time.perf_counter() - t_start,
    }
    store_lib.atomic_write_bytes(workdir / "results.json", json.dumps(results, indent=2).encode())
    report_lib.write_report(workdir, results)
    log(f"compare: done in {results['wall_s']:.0f}s; report in {workdir / 'report.md'}")
    return results


def _random_summary(rows: Sequence[dict]) -> dict[str, float] | None:
    randoms = [r for r in rows if r["kind"] == "random"]
    if not randoms:
        return None
    out = {"seeds": len(randoms)}
    for key in ("nll_per_token", "perplexity", "win_rate_vs_base", "delta_nll_per_token"):
        vals = np.asarray([r[key] for r in randoms], np.float64)
        out[key] = float(vals.mean())
        out[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    return out
