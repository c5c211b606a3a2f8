"""Does the golden set beat the alternatives? Every selector picks k records of one pool, the same
model is fine-tuned on each pick with the same budget, and every model and the base model are
evaluated on held-out sets with references.

Phases of `run_selector_comparison`, each resumable (a rerun skips what is done):
1. split: a seeded `heldout` records of the pool are the evaluation set "heldout"; the rest is the
   selection pool (WORKDIR/data/selection_pool.json, heldout.json);
2. task set: K-means over the selection pool (`tasksets.build_from_config`; WORKDIR/taskset/);
3. scoring: the selection pool against the task set with the baseline pass
   (`baselines.compute`), one run for every metric and baseline (WORKDIR/scoring/);
4. selections: each selector's k records: a Nuggets metric or baseline by rank, `diverse` the
   diversity-aware rule over `diversity.metric`, `random` one pick per seed;
5. fine-tuning and evaluation: every selection trained at equal steps (`compare.train_variant`),
   every model and the base evaluated on every set (`compare.evaluate_variant`, saved per set);
6. results.json and report.md: one table (NLL per token and win rate over the base per set,
   random as mean ± std over its seeds) and one plot.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import metrics as metrics_lib
from nuggets_jax import plots as plots_lib
from nuggets_jax import select as select_lib
from nuggets_jax import sharding, synthetic
from nuggets_jax import store as store_lib
from nuggets_jax.errors import UserError
from nuggets_jax.finetune import compare
from nuggets_jax.finetune import data as finetune_data
from nuggets_jax.finetune import step as finetune_step

# Selectors: any ranking column of the scoring run (a Nuggets metric or a baseline), plus these two.
DIVERSE, RANDOM = "diverse", "random"
SELECTORS = ("win_rate", "mean_logp_gain", DIVERSE, "ifd", "perplexity", "length", RANDOM)
HELDOUT = "heldout"
# How the report names each template.
_TEMPLATE_NAMES = {"text": "the paper's text template", "chat": "the model's chat template"}


class SelectorComparisonError(UserError):
    """A selector comparison config that cannot run; the message names the field."""


def selector_names() -> tuple[str, ...]:
    """Every selector the comparison knows."""
    return (*metrics_lib.METRICS, *metrics_lib.BASELINES, DIVERSE)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses selectors, sizes and evaluation sets that cannot run, before anything is computed."""
    known = selector_names()
    unknown = [s for s in config.selectors if s not in known]
    if unknown or not config.selectors:
        raise SelectorComparisonError(f"unknown selectors {unknown}; choose from {', '.join(known)}.")
    if RANDOM in config.selectors and not config.random_seeds:
        raise SelectorComparisonError("selector 'random' needs at least one seed in random_seeds.")
    if config.diversity.metric not in (*metrics_lib.METRICS, *metrics_lib.BASELINES):
        raise SelectorComparisonError(f"diversity.metric={config.diversity.metric!r} is not a metric or baseline.")
    if config.k < 1 or config.heldout < 0:
        raise SelectorComparisonError(f"k={config.k} must be >= 1 and heldout={config.heldout} >= 0.")
    if not config.eval.sets:
        raise SelectorComparisonError("eval.sets is empty: name at least one evaluation set.")
    if HELDOUT in config.eval.sets and not config.heldout:
        raise SelectorComparisonError("eval.sets names 'heldout' but heldout=0: hold out some pool records.")
    select_lib.Diversity(config.diversity.trade_off, config.diversity.method, config.diversity.shortlist)
    if config.template not in ("auto", *data_lib.TEMPLATES):
        raise SelectorComparisonError(f"template={config.template!r}; choose auto, {', '.join(data_lib.TEMPLATES)}.")


# -- 1. split ------------------------------------------------------------------------------------


def _pool_objects(config) -> tuple[list[dict], str, str]:
    """The pool as JSON objects, each with an "id" (its own, else its position), its source and the
    template (`config.template`; "auto" = chat when a record is a conversation, else text)."""
    if config.pool == "default":
        objects = synthetic.generate_pool(config.pool_size, config.seed)
        source = f"<generated pool: {config.pool_size} records, seed {config.seed}>"
    else:
        path = pathlib.Path(config.pool).expanduser()
        objects = [obj for _, obj in data_lib.read_objects(path, "pool")]
        source = str(path)
    out = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise SelectorComparisonError(f"{source}: record {i} is not a JSON object.")
        out.append({**obj, "id": obj.get("id", i)})
    # Records with an empty response can be neither scored, trained on nor used as references.
    empty: list[str] = []
    records = data_lib.records_from_objects(
        [(f"{source}[{i}]", o) for i, o in enumerate(out)], source, "pool", config.score.data.format, empty
    )
    chat = next((r for r in records if r.is_conversation), None)
    template = config.template if config.template != "auto" else "chat" if chat is not None else "text"
    if chat is not None and template != "chat":
        raise SelectorComparisonError(
            f"{source}: record {chat.id!r} is a conversation ({chat.format}); the text template reads "
            "instruction/input/output only. Add --config.template=chat to use the model's chat template."
        )
    positions = [r.position for r in records][: config.max_pool or None]
    # The empty ones among the records read up to the last one kept.
    left_out = sorted(set(range(positions[-1])) - set(positions))
    if left_out:
        source += f" ({len(left_out)} record(s) with an empty response left out, first {source}[{left_out[0]}])"
    return [out[i] for i in positions], source, template


def split_pool(objects: Sequence[dict], heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(selection pool, held-out records): `heldout` records drawn with `seed`, both in pool order."""
    if heldout >= len(objects):
        raise SelectorComparisonError(
            f"heldout={heldout} leaves no selection pool: the pool has {len(objects)} records."
        )
    held = np.zeros(len(objects), bool)
    held[np.random.default_rng(seed).choice(len(objects), size=heldout, replace=False)] = True
    return [o for o, h in zip(objects, held, strict=True) if not h], [
        o for o, h in zip(objects, held, strict=True) if h
    ]


def _write_json(path: pathlib.Path, objects: Sequence[dict]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(list(objects), ensure_ascii=False, indent=1).encode()
    if not path.is_file() or path.read_bytes() != text:  # an unchanged file keeps the scoring fingerprint's digest
        store_lib.atomic_write_bytes(path, text)
    return path


# -- 4. selections -------------------------------------------------------------------------------


def choose_selections(
    values: dict[str, np.ndarray],
    k: int,
    selectors: Sequence[str],
    random_seeds: Sequence[int],
    diversity: select_lib.Diversity,
    diversity_metric: str,
    embed: Callable[[np.ndarray], np.ndarray],
    eligible: np.ndarray | None = None,
) -> list[compare.Variant]:
    """Each selector's k records (indices into the selection pool).

    Args:
      values: ranking column -> [C] values in pool order (NaN is never chosen).
      k: records per selection.
      selectors: names (`selector_names()` and "random").
      random_seeds: one random selection per seed.
      diversity: the `diverse` selector's rule over `values[diversity_metric]`.
      embed: pool indices -> [M, D] embeddings (the diverse selector's shortlist).
      eligible: [C] bool, the records every selector may pick (default all): others are never chosen.
    """
    num = next(iter(values.values())).size
    eligible = np.ones(num, bool) if eligible is None else np.asarray(eligible, bool)
    values = {name: np.where(eligible, v, np.nan) for name, v in values.items()}
    allowed = np.flatnonzero(eligible)
    if not 1 <= k <= allowed.size:
        raise SelectorComparisonError(
            f"k={k} must be in [1, {allowed.size}] (the selection pool has {allowed.size} records to pick from)."
        )
    out = []
    for name in selectors:
        if name == RANDOM:
            for seed in random_seeds:
                # k of the whole pool, the ineligible ones replaced by a draw from the eligible rest: a
                # uniform k-subset of the eligible records, and the same picks as without `eligible`
                # when the first draw holds none.
                rng = np.random.default_rng(seed)
                drawn = rng.choice(num, size=k, replace=False)
                drawn = drawn[eligible[drawn]]
                refill = rng.choice(np.setdiff1d(allowed, drawn), size=k - drawn.size, replace=False)
                chosen = np.sort(np.concatenate([drawn, refill]))
                out.append(compare.Variant(f"random_s{seed}", RANDOM, chosen, int(seed)))
        elif name == DIVERSE:
            rule = select_lib.SelectionRule(top_n=k, diversity=diversity)
            metric = values[diversity_metric]
            out.append(compare.Variant(DIVERSE, DIVERSE, rule.select(metric, embed(rule.shortlist(metric)))))
        else:
            chosen = select_lib.select(values[name], top_n=k)
            if chosen.size < k:
                raise SelectorComparisonError(
                    f"selector {name!r} has only {chosen.size} scored records for k={k} (the others are NaN, e.g. "
                    "IFD at or above baselines.ifd_max, or too long to train on); lower k or raise "
                    "score.baselines.ifd_max."
                )
            out.append(compare.Variant(name, name, chosen))
    return out


def _embedder(loaded, pool: Sequence[data_lib.Record], template, log) -> Callable[[np.ndarray], np.ndarray]:
    def embed(indices: np.ndarray) -> np.ndarray:
        from nuggets_jax.scoring import embedding

        log(f"selectors: embedding {len(indices)} shortlisted records for the diverse selection")
        return embedding.embed_records(loaded.model, loaded.tokenizer, [pool[i] for i in indices], template)[0]

    return embed


# -- 6. results and report -----------------------------------------------------------------------

_STATS = ("nll_per_token", "delta_nll_per_token", "win_rate_vs_base")


def summarize(rows: Sequence[dict], sets: Sequence[str]) -> list[dict]:
    """One line per selector: its rows' mean (and std over seeds when several) per set and statistic."""
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        group = [r for r in rows if r["kind"] == kind]
        line: dict[str, Any] = {"selector": kind, "runs": len(group), "records": group[0]["records"]}
        for name in sets:
            for stat in _STATS:
                vals = np.asarray([r["eval"][name][stat] for r in group], np.float64)
                line[f"{name}/{stat}"] = float(vals.mean())
                line[f"{name}/{stat}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else None
        out.append(line)
    return out


def _cell(line: dict, key: str, spec: str) -> str:
    std = line.get(f"{key}_std")
    return format(line[key], spec) + ("" if std is None else f" ± {format(std, spec.lstrip('+'))}")


def _plot(results: dict, path: pathlib.Path) -> str:
    lines, sets = results["summary"], results["eval_sets"]
    figure, axes = plots_lib.new_axes(1.6 * len(sets) * max(1, len(lines)) / 3 + 4.0, 4.2)
    width = 0.8 / max(1, len(lines))
    for i, line in enumerate(lines):
        x = np.arange(len(sets)) + (i - (len(lines) - 1) / 2) * width
        heights = [line[f"{s}/delta_nll_per_token"] for s in sets]
        errors = [line[f"{s}/delta_nll_per_token_std"] or 0.0 for s in sets]
        axes.bar(x, heights, width, yerr=errors, capsize=3, label=line["selector"])
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(sets)), sets)
    axes.set(title="Held-out NLL per token minus the base model's (lower is better)", ylabel="Δ NLL / token")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not on them
    return plots_lib.save_png(figure, path)


def _untrainable(results: dict) -> str:
    n = results.get("untrainable", 0)
    return f" ({n} of them too long to train on within train.max_tokens, never picked)" if n else ""


def write_report(workdir: pathlib.Path, results: dict) -> pathlib.Path:
    """WORKDIR/report.md from results.json's content: the table, the plot and the run details."""
    plots = workdir / "plots"
    plots.mkdir(exist_ok=True)
    sets = results["eval_sets"]
    header = ["selector", "runs"]
    for name in sets:
        header += [f"{name}: NLL/token", f"{name}: Δ vs base", f"{name}: win rate vs base"]
    rows = [
        ["base (not fine-tuned)", "–"]
        + [c for s in sets for c in (f"{results['base'][s]['nll_per_token']:.4f}", "–", "–")]
    ]
    for line in results["summary"]:
        cells = [line["selector"], str(line["runs"])]
        for name in sets:
            cells += [
                _cell(line, f"{name}/nll_per_token", ".4f"),
                _cell(line, f"{name}/delta_nll_per_token", "+.4f"),
                _cell(line, f"{name}/win_rate_vs_base", ".3f"),
            ]
        rows.append(cells)
    train = results["train"]
    described = "; ".join(
        f"`{s}`: {results['eval'][s]['source']} ({results['eval'][s]['examples']} examples)" for s in sets
    )
    parts = [
        "# Selector comparison: which k records to fine-tune on",
        "",
        f"- Pool: {results['pool']} ({results['pool_size']} records); {results['heldout']} held out, "
        f"{results['selection_pool_size']} to select from{_untrainable(results)}; every selector picks "
        f"k = {results['k']}; "
        f"{_TEMPLATE_NAMES[results.get('template', 'text')]} for the task set, scoring, training and evaluation.",
        f"- Nuggets metrics from a K-means task set of {results['tasks']} tasks (`{results['taskset']}`); baselines "
        f"from the same model's baseline pass; `diverse` = {results['diversity']}.",
        f"- Model: `{results['model']}`; training equal for every selection: {train['steps']} steps of "
        f"{train['micro_batches'] * train['batch_rows']} packed rows, lr {train['learning_rate']:g}, compute dtype "
        f"{train['dtype']}.",
        f"- Evaluation sets: {described}. Win rate = share of examples whose response NLL is below the base "
        "model's (ties 1/2); a ± is the std over random seeds.",
        "",
        plots_lib.markdown_table(header, rows).rstrip("\n"),
        "",
        f"![delta NLL]({_plot(results, plots / 'selectors.png')})",
        "",
        "## Runs",
        "",
        plots_lib.markdown_table(
            ["run", "selector", "records", "steps", "train loss (last 5)", "train s", "eval s"],
            [
                [
                    r["variant"],
                    r["kind"],
                    str(r["records"]),
                    str(r["steps"]),
                    f"{r['final_train_loss']:.4f}",
                    f"{r['train_wall_s']:.0f}",
                    f"{r['eval_s']:.1f}",
                ]
                for r in results["variants"]
            ],
        ).rstrip("\n"),  # fmt: skip
        "",
        f"This invocation took {results['wall_s']:.0f} s (finished training and evaluations are reused on a rerun).",
        "",
    ]
    path = workdir / "report.md"
    store_lib.atomic_write_bytes(path, "\n".join(parts).encode())
    return path


# -- the phases ----------------------------------------------------------------------------------


def _set_name(name: str) -> str:
    return {HELDOUT: HELDOUT, "default": "generated"}.get(name) or pathlib.Path(name).stem


def run_selector_comparison(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, log=print) -> dict:
    """Runs every phase (module docstring); writes results.json and report.md; returns the results."""
    from nuggets_jax import models, tasksets
    from nuggets_jax.scoring import job

    t_start = time.perf_counter()
    check_config(config)
    workdir = pathlib.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    train = finetune_step.TrainConfig(**config.train.to_dict())
    train.validate()
    # The scoring run's XLA:CPU devices (one per core unless its mesh.cpu_devices says otherwise),
    # set before the first JAX call below starts the backend with one.
    sharding.set_cpu_devices(job.cpu_devices(config.score)[0])
    import jax

    train = train.resolved(jax.default_backend())

    # 1. Split: held-out pool records for evaluation, the rest to select from.
    objects, pool_source, template_kind = _pool_objects(config)
    selection, heldout = split_pool(objects, config.heldout, config.seed)
    pool_path = _write_json(workdir / "data" / "selection_pool.json", selection)
    heldout_path = _write_json(workdir / "data" / "heldout.json", heldout) if heldout else None
    log(
        f"selectors: {len(objects)} pool records from {pool_source}: {len(selection)} to select from, "
        f"{len(heldout)} held out; {template_kind} template"
    )

    # 2. The K-means task set, drawn from the selection pool.
    taskset_config = copy.deepcopy(config.taskset)
    taskset_config.source = str(pool_path)
    taskset_config.model.path = config.model.path
    taskset_config.data.template = template_kind
    tasks_path = tasksets.build_from_config(taskset_config, workdir / "taskset", log)

    # 3. One scoring run: every Nuggets metric and every baseline.
    score = copy.deepcopy(config.score)
    score.model.path = config.model.path
    score.data.pool, score.data.tasks = str(pool_path), str(tasks_path)
    score.data.template = template_kind
    score.baselines.compute = True
    score.progress = config.progress
    job.run_score(score, workdir / "scoring", log)

    # 4. The selections.
    spec_inputs = job.load_inputs(score, workdir / "scoring")
    spec = compare.ComparisonSpec(
        workdir=workdir,
        train=train,
        scoring_workdir=workdir / "scoring",
        inputs=spec_inputs,
        metric="win_rate",
        top_k=config.k,
        variants=(),
        template=data_lib.Template.from_config(score.data) if job.data_form(score)["template"] == "text" else None,
        model_path=config.model.path,
        fresh=config.fresh,
        progress=config.progress,
        mesh_model=int(config.mesh.model),
    )
    loaded = models.load_model(
        spec.model_path, dtype="float32", mesh=sharding.make_mesh(spec.mesh_model), replicate_kv=False
    )
    fingerprint = models.model_fingerprint(loaded.model_dir)
    names = (*metrics_lib.METRICS, *metrics_lib.BASELINES)
    ranking = workdir / "scoring" / "ranking.jsonl"
    values = {n: compare.ranking_values(ranking, spec_inputs.pool, n) for n in names}
    diversity = select_lib.Diversity(config.diversity.trade_off, config.diversity.method, config.diversity.shortlist)
    template = compare.template_of(spec, loaded.tokenizer)
    # Records that keep no response token within train.max_tokens cannot be trained on: no selector picks them.
    untrainable: list[str] = []
    finetune_data.tokenize_examples(
        loaded.tokenizer, spec_inputs.pool, template, train.max_tokens, train.eos, train.bos, "selection pool",
        untrainable,
    )  # fmt: skip
    if untrainable:
        log(
            f"selectors: {len(untrainable)} record(s) of the selection pool keep no response token within "
            f"train.max_tokens={train.max_tokens}; no selector picks them (ids {', '.join(untrainable[:5])}"
            f"{' ...' if len(untrainable) > 5 else ''})"
        )
    left_out = set(untrainable)
    eligible = np.asarray([r.id not in left_out for r in spec_inputs.pool])
    variants = choose_selections(
        values, config.k, config.selectors, config.random_seeds, diversity, config.diversity.metric,
        _embedder(loaded, spec_inputs.pool, template, log), eligible,
    )  # fmt: skip
    store_lib.atomic_write_bytes(
        workdir / "selections.json",
        json.dumps({v.name: [spec_inputs.pool[i].id for i in v.indices] for v in variants}, indent=1).encode(),
    )

    # 5. The base model and every selection on every evaluation set.
    held, base = {}, {}
    for name in config.eval.sets:
        key = _set_name(name)
        if name == HELDOUT:
            records = data_lib.read_records(heldout_path, "eval")
            records, source = (
                records[: config.eval.max_examples or None],
                f"{len(heldout)} records held out of the pool",
            )
        else:
            records, source = compare.eval_records(config.eval, name, spec_inputs.tasks)
        held[key] = compare.held_out_set(records, source, config.eval.max_tokens, spec, loaded, fingerprint, log)
        base[key], _ = compare.cached_eval(
            workdir / f"base_eval_{key}.json", {**held[key].key, "params": "base"}, held[key].evaluator.evaluate
        )
    rows = []
    for variant in variants:
        result, fields = compare.train_variant(spec, variant, loaded, fingerprint, log)
        evals, seconds = {}, 0.0
        for key, held_out in held.items():
            path = workdir / "runs" / variant.name / f"eval_{key}.json"
            evals[key], eval_s = compare.evaluate_variant(held_out, result, base[key], path)
            seconds += eval_s
        rows.append({**fields, "eval": evals, **compare.training_fields(result), "eval_s": seconds})
        log(
            f"selectors: {variant.name}: "
            + ", ".join(f"{k} Δ NLL/token {v['delta_nll_per_token']:+.4f}" for k, v in evals.items())
        )

    # 6. results.json and the report.
    sets = list(held)
    results = {
        "pool": pool_source,
        "pool_size": len(objects),
        "heldout": len(heldout),
        "selection_pool_size": len(selection),
        "k": config.k,
        "untrainable": len(untrainable),
        "template": template_kind,
        "taskset": str(tasks_path),
        "tasks": len(spec_inputs.tasks),
        "diversity": f"{diversity.describe()} of {config.diversity.metric}",
        "model": str(loaded.model_dir),
        "eval_sets": sets,
        "eval": {
            k: {"source": h.source, "examples": len(h.records), "pool_overlap": h.pool_overlap} for k, h in held.items()
        },
        "base": {k: b.summary() for k, b in base.items()},
        "train": dataclasses.asdict(spec.train),
        "variants": rows,
        "summary": summarize(rows, sets),
        "wall_s": time.perf_counter() - t_start,
    }
    store_lib.atomic_write_bytes(workdir / "results.json", json.dumps(results, indent=2).encode())
    write_report(workdir, results)
    log(f"selectors: done in {results['wall_s']:.0f}s; report in {workdir / 'report.md'}")
    return results
