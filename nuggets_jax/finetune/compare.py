"""What the selection buys: fine-tune on golden top-k, random-k (several seeds) and the full pool at
equal training steps, then evaluate every model and the base model on one held-out set.

Inputs come from a scoring run (its workdir: config.json, ranking.jsonl, golden.json), or the
scoring job runs first into `WORKDIR/scoring`. Outputs in WORKDIR: `runs/<variant>/` (checkpoints,
train_log.jsonl, eval.json), `results.json`, `report.md` with the table and `plots/`. Everything
resumes: a finished variant is not retrained and its evaluation is reused.
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
from nuggets_jax import plots as plots_lib
from nuggets_jax import select as select_lib
from nuggets_jax import store as store_lib
from nuggets_jax import synthetic
from nuggets_jax.errors import UserError
from nuggets_jax.finetune import data as finetune_data
from nuggets_jax.finetune import evaluate as evaluate
from nuggets_jax.finetune import step as finetune_step
from nuggets_jax.finetune import train as finetune
from nuggets_jax.metrics import METRICS
from nuggets_jax.scoring import job as job

VARIANTS = ("golden", "random", "full")
_KIND_COLORS = {"golden": "tab:orange", "random": "tab:gray", "full": "tab:blue"}


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
        missing = [n for n in ("config.json", "ranking.jsonl", "golden.json") if not (sdir / n).is_file()]
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


def _ranking_values(path: pathlib.Path, pool: Sequence[data_lib.Record], metric: str) -> np.ndarray:
    by_id = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            by_id[str(entry["id"])] = entry
    missing = [r.id for r in pool if r.id not in by_id]
    if missing:
        raise CompareError(f"{path}: has no line for pool ids {missing[:5]}; it belongs to another pool.")
    values = [by_id[r.id].get(metric) for r in pool]
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _cached_eval(
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


def run_comparison(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, log=print) -> dict[str, Any]:
    """Trains and evaluates every variant; writes results.json, report.md and plots; returns the results."""
    from nuggets_jax import models

    t_start = time.perf_counter()
    workdir = pathlib.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    train_config = finetune_step.TrainConfig(**config.train.to_dict())
    train_config.validate()
    sdir = _scoring_run(config, workdir, log)
    score_config = ml_collections.ConfigDict(json.loads((sdir / "config.json").read_text()))
    inputs = job.load_inputs(score_config, sdir)
    pool = inputs.pool
    metric = config.metric or score_config.metric
    if metric not in METRICS:
        raise CompareError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}.")
    top_k = config.top_k or len(select_lib.read_golden(sdir / "golden.json"))
    values = _ranking_values(sdir / "ranking.jsonl", pool, metric)
    variants = choose_variants(values, top_k, list(config.variants), list(config.random_seeds))
    template = data_lib.Template.from_config(score_config.data)

    model_path = config.model.path or score_config.model.path
    loaded = models.load_model(model_path, dtype="float32")
    model_fingerprint = models.model_fingerprint(loaded.model_dir)
    if config.eval.set == "default":
        eval_records = default_eval_set(config.eval.size, config.eval.seed, inputs.tasks)
        eval_source = f"generated: synthetic.generate_tasks({config.eval.size}, seed={config.eval.seed})"
        eval_records = eval_records[: config.eval.max_examples or None]
    else:
        eval_records = evaluate.read_eval_set(config.eval.set, config.eval.format, config.eval.max_examples)
        eval_source = str(config.eval.set)
    pool_keys = {(r.instruction, r.input) for r in pool}
    overlap = sum((r.instruction, r.input) in pool_keys for r in eval_records)
    if overlap:
        log(f"compare: warning: {overlap} eval example(s) repeat a pool example's instruction and input")
    base_eval_model = finetune_step.merge_params(loaded.model, nnx.split(loaded.model)[1], train_config.dtype)
    evaluator = evaluate.Evaluator(
        base_eval_model, loaded.tokenizer, eval_records, template, config.eval.max_tokens, train_config.bos, log=log
    )
    eval_key = {
        "model": model_fingerprint,
        "dtype": train_config.dtype,
        "eval": _digest([[int(t) for t in ids] for ids in evaluator.tasks.ids]),
        "response_start": evaluator.tasks.response_start.tolist(),
    }
    log(f"compare: {len(pool)} pool records, top_k={top_k} by {metric}, {len(eval_records)} eval examples")
    base, base_eval_s = _cached_eval(workdir / "base_eval.json", {**eval_key, "params": "base"}, evaluator.evaluate)
    categories = [r.raw.get("category") for r in eval_records]
    has_categories = all(isinstance(c, str) for c in categories)

    rows = []
    for variant in variants:
        subset = [pool[i] for i in variant.indices]
        examples = finetune_data.tokenize_examples(
            loaded.tokenizer, subset, template, train_config.max_tokens, train_config.eos, train_config.bos
        )
        run_dir = workdir / "runs" / variant.name
        log(f"compare: training {variant.name} on {len(subset)} records")
        result = finetune.train(
            loaded.model,
            examples,
            train_config,
            run_dir,
            loaded.hf_config,
            loaded.model_dir,
            log=log,
            progress=config.progress,
            fingerprint_extra={
                "model": model_fingerprint,
                "template": [template.prompt_no_input, template.prompt_with_input],
            },
            fresh=config.fresh,
        )
        key = {**eval_key, "params": str(result.final_checkpoint), "train": result.log[-1]}
        scores, eval_s = _cached_eval(run_dir / "eval.json", key, functools.partial(evaluator.evaluate, result.params))
        corrupted = [r.raw.get("corruption") for r in subset]
        seen = sum(e["examples"] for e in result.log)
        row = {
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
            **scores.summary(base),
            "by_category": scores.by_group(categories) if has_categories else None,
            "train_wall_s": float(sum(e["wall_s"] for e in result.log)),
            "eval_s": eval_s,
            # From the saved log, so a resumed comparison reports the run that trained it.
            "tokens_per_s": sum(e["tokens"] for e in result.log) / max(1e-9, sum(e["wall_s"] for e in result.log)),
            "programs_compiled": result.programs,
            "checkpoint": str(result.final_checkpoint),
            "loss_curve": [e["loss"] for e in result.log],
        }
        rows.append(row)
    results = {
        "scoring_workdir": str(sdir),
        "metric": metric,
        "top_k": top_k,
        "pool": inputs.pool_source,
        "pool_size": len(pool),
        "model": str(loaded.model_dir),
        "eval": {
            "source": eval_source,
            "examples": len(eval_records),
            "response_tokens": int(evaluator.tasks.n_tokens.sum()),
            "max_tokens": config.eval.max_tokens,
            "pool_overlap": overlap,
        },
        "base": {**base.summary(), "by_category": base.by_group(categories) if has_categories else None},
        "base_eval_s": base_eval_s,
        "train": dataclasses.asdict(train_config),
        "variants": rows,
        "random_summary": _random_summary(rows),
        "wall_s": time.perf_counter() - t_start,
    }
    store_lib.atomic_write_bytes(workdir / "results.json", json.dumps(results, indent=2).encode())
    write_report(workdir, results)
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


# -- report ----------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, spec) if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def _plot_eval(results: dict, path: pathlib.Path) -> str:
    rows = results["variants"]
    figure, axes = plots_lib.new_axes(1.1 * len(rows) + 3.0, 4.0)
    names = [r["variant"] for r in rows]
    axes.bar(range(len(rows)), [r["nll_per_token"] for r in rows], color=[_KIND_COLORS[r["kind"]] for r in rows])
    axes.axhline(results["base"]["nll_per_token"], color="black", linestyle="--", label="base model")
    axes.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    low = min(results["base"]["nll_per_token"], *(r["nll_per_token"] for r in rows))
    high = max(results["base"]["nll_per_token"], *(r["nll_per_token"] for r in rows))
    axes.set_ylim(max(0.0, low - 0.15 * (high - low + 1e-9)), high + 0.1 * (high - low + 1e-9))
    axes.set(title=f"Held-out response NLL per token ({results['eval']['examples']} examples)", ylabel="NLL / token")
    axes.legend()
    return plots_lib.save_png(figure, path)


def _plot_loss(results: dict, path: pathlib.Path) -> str:
    figure, axes = plots_lib.new_axes(6.4, 4.0)
    styles = iter(["-", "--", ":", "-."] * 8)
    for r in results["variants"]:
        curve = np.asarray(r["loss_curve"])
        style = next(styles) if r["kind"] == "random" else "-"
        color = _KIND_COLORS[r["kind"]]
        axes.plot(np.arange(1, curve.size + 1), curve, style, color=color, label=r["variant"], alpha=0.85)
    axes.set(title="Training loss (response tokens)", xlabel="step", ylabel="loss / token")
    axes.legend()
    return plots_lib.save_png(figure, path)


def write_report(workdir: str | pathlib.Path, results: dict) -> pathlib.Path:
    """WORKDIR/report.md: the comparison table, per-category NLL, run details and two plots."""
    workdir = pathlib.Path(workdir)
    plots = workdir / "plots"
    plots.mkdir(exist_ok=True)
    train = results["train"]
    base = results["base"]
    header = [
        "variant",
        "records",
        "clean",
        "epochs",
        "train tokens",
        "train loss (last 5 steps)",
        "eval NLL/token",
        "eval PPL",
        "Δ NLL vs base",
        "win rate vs base",
    ]
    rows = [
        [
            "base (not fine-tuned)",
            "–",
            "–",
            "–",
            "–",
            "–",
            _fmt(base["nll_per_token"]),
            _fmt(base["perplexity"], ".3f"),
            "–",
            "–",
        ]
    ]
    for r in results["variants"]:
        rows.append(
            [
                r["variant"],
                str(r["records"]),
                _fmt(r["clean_fraction"], ".0%"),
                _fmt(r["epochs"], ".1f"),
                str(r["train_tokens"]),
                _fmt(r["final_train_loss"]),
                _fmt(r["nll_per_token"]),
                _fmt(r["perplexity"], ".3f"),
                _fmt(r["delta_nll_per_token"], "+.4f"),
                _fmt(r["win_rate_vs_base"], ".3f"),
            ]
        )
    summary = results["random_summary"]
    if summary and summary["seeds"] > 1:
        rows.append(
            [f"random (mean ± std, {summary['seeds']} seeds)", "", "", "", "", ""]
            + [
                f"{summary['nll_per_token']:.4f} ± {summary['nll_per_token_std']:.4f}",
                f"{summary['perplexity']:.3f} ± {summary['perplexity_std']:.3f}",
                f"{summary['delta_nll_per_token']:+.4f}",
                f"{summary['win_rate_vs_base']:.3f} ± {summary['win_rate_vs_base_std']:.3f}",
            ]
        )
    step_tokens = train["micro_batches"] * train["batch_rows"]
    parts = [
        "# Fine-tuning comparison: golden vs random vs full pool",
        "",
        f"- Pool: {results['pool']} ({results['pool_size']} records); golden = top {results['top_k']} by "
        f"`{results['metric']}` from `{results['scoring_workdir']}`; random = {results['top_k']} records per seed.",
        f"- Model: `{results['model']}`, compute dtype {train['dtype']}.",
        f"- Training, equal for every variant: {train['steps']} steps of {step_tokens} packed rows "
        f"({train['micro_batches']} micro-batch(es) x {train['batch_rows']} rows), AdamW lr {train['learning_rate']:g} "
        f"(warmup {train['warmup_steps']}, cosine to {train['end_learning_rate']:g}x), weight decay "
        f"{train['weight_decay']:g}, clip {train['clip_norm']:g}; loss on response (+eos) tokens only.",
        f"- Evaluation: {results['eval']['source']}: {results['eval']['examples']} examples, "
        f"{results['eval']['response_tokens']} response tokens, {results['eval']['pool_overlap']} repeating a pool "
        "example. Win rate = share of examples whose response NLL is lower than the base model's (ties count 1/2).",
        "",
        _table(header, rows),
        "",
        f"![eval NLL]({_plot_eval(results, plots / 'eval_nll.png')})",
        "",
        f"![loss curves]({_plot_loss(results, plots / 'loss_curves.png')})",
    ]
    if base.get("by_category"):
        cats = list(base["by_category"])
        cat_rows = [["base", *(_fmt(base["by_category"][c]) for c in cats)]]
        cat_rows += [[r["variant"], *(_fmt(r["by_category"][c]) for c in cats)] for r in results["variants"]]
        parts += ["", "## Eval NLL per token by category", "", _table(["variant", *cats], cat_rows)]
    detail = [
        [
            r["variant"],
            _fmt(r["train_wall_s"], ".0f"),
            _fmt(r["tokens_per_s"], ".0f"),
            _fmt(r["eval_s"], ".1f"),
            str(r["programs_compiled"]),
            f"`{r['checkpoint']}`",
        ]
        for r in results["variants"]
    ]
    parts += [
        "",
        "## Run details",
        "",
        _table(["variant", "train s", "train tokens/s", "eval s", "programs compiled", "final checkpoint"], detail),
        "",
        f"Base model evaluation {results['base_eval_s']:.1f}s; this invocation {results['wall_s']:.0f}s (a resumed "
        "comparison skips finished training and evaluations; the table shows the times of the runs that did them).",
        "",
    ]
    path = workdir / "report.md"
    store_lib.atomic_write_bytes(path, "\n".join(parts).encode())
    return path
