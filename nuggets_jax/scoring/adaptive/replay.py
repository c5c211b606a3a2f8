"""Adaptive against exact scoring on one pool: recall of the exact golden set against compute.

`run_evaluation` (experiments/adaptive_eval.py, configs/adaptive_eval.py) scores a seeded sample
of the pool exactly once (or reuses DIR/exact/scores.npz), then replays every adaptive setting
offline on the exact per-(candidate, task) values with `rule.simulate`: the rule needs nothing
else, so the replay makes exactly the decisions a real run would. Optionally one setting also runs
through the engine into DIR/<real_run.subdir>, for the compute it really saves. It writes
DIR/pool.json, DIR/results.json, DIR/report.md and DIR/plots/ (`replay_report`).
"""

from __future__ import annotations

import copy
import itertools
import json
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import metrics as metrics_lib
from nuggets_jax import select as select_lib
from nuggets_jax.scoring.adaptive.config import AdaptiveConfig, AdaptiveError
from nuggets_jax.scoring.adaptive.intervals import known_range, per_task_values
from nuggets_jax.scoring.adaptive.replay_report import plot_frontier, write_report
from nuggets_jax.scoring.adaptive.rule import Rule, simulate


def sample_pool(source: str, size: int, seed: int) -> list[dict]:
    """A seeded sample of `size` records with a non-empty instruction and output (all when size is 0)."""
    if source == "default":
        from nuggets_jax import synthetic

        objects = synthetic.generate_pool()
    else:
        objects = [obj for _, obj in data_lib.read_objects(pathlib.Path(source).expanduser(), "pool.source")]
    keep = [o for o in objects if str(o.get("instruction", "")).strip() and str(o.get("output", "")).strip()]
    if not size or size >= len(keep):
        return keep
    index = np.sort(np.random.default_rng(seed).choice(len(keep), size, replace=False))
    return [keep[i] for i in index]


def score_config(config, pool_path: pathlib.Path, **changes):
    """A copy of `config.score` scoring `pool_path`, with `changes` ("a.b": value) applied."""
    cfg = copy.deepcopy(config.score)
    with cfg.unlocked():
        for dotted, value in changes.items():
            node = cfg
            *parents, leaf = dotted.split(".")
            for name in parents:
                node = node[name]
            node[leaf] = value
        cfg.data.pool = str(pool_path)
        cfg.progress = False
    return cfg


def parse_settings(text: str) -> list[tuple[str, dict]]:
    """ "betting,joint; normal,candidate,panel=8" -> [(label, adaptive.* overrides), ...]."""
    settings = []
    for item in text.split(";"):
        parts = [p.strip() for p in item.split(",") if p.strip()]
        if not parts:
            continue
        if len(parts) < 2 or parts[0] not in ("betting", "normal") or parts[1] not in ("joint", "candidate"):
            raise AdaptiveError(
                f"settings: {item.strip()!r} must start with an interval (betting | normal) and a guarantee "
                "(joint | candidate), e.g. 'normal,candidate,compare=pairwise'."
            )
        overrides = {"interval": parts[0], "union": parts[1] == "joint"}
        for extra in parts[2:]:
            key, _, value = extra.partition("=")
            overrides[key.strip()] = _number_or_text(value.strip())
        settings.append((" ".join(parts), overrides))
    return settings


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def exact_run(config, workdir: pathlib.Path, pool_path: pathlib.Path, log: Callable[[str], None]) -> tuple[dict, dict]:
    """scores.npz and run.json of the exact run (scored now unless they exist)."""
    from nuggets_jax.scoring import job

    exact_dir = pathlib.Path(config.exact_workdir or workdir / "exact")
    if not (exact_dir / "scores.npz").is_file():
        log(f"exact run into {exact_dir} (reruns resume it)")
        job.run_score(score_config(config, pool_path, report=False), exact_dir, log=log)
    with np.load(exact_dir / "scores.npz") as z:
        scores = {k: z[k] for k in z.files}
    run = _read_json(exact_dir / "run.json") if (exact_dir / "run.json").is_file() else {}
    return scores, run


def _values(metric: str, scores: dict) -> np.ndarray:
    """[C, T] the exact per-task values of `metric`."""
    return per_task_values(
        metric,
        scores["one_logp"],
        scores["one_correct"],
        scores["zero_logp"],
        scores["zero_correct"],
        scores["n_tokens"],
    )


def replay(scores: dict, config, log: Callable[[str], None]) -> list[dict]:
    """Every (metric, golden fraction, setting, confidence), averaged over task permutations."""
    rows = []
    c = scores["one_logp"].shape[0]
    for metric in config.metrics:
        values = _values(metric, scores)
        known = known_range(metric, scores["zero_logp"], scores["zero_correct"], scores["n_tokens"])
        exact = values.mean(axis=1)
        combos = itertools.product(config.fractions, parse_settings(config.settings), config.confidences)
        for fraction, (label, overrides), confidence in combos:
            selection = select_lib.SelectionRule(top_fraction=fraction)
            truth = selection.select(exact)
            rule = Rule.from_selection(selection, c)
            recalls, fractions, spearmans = [], [], []
            for seed in range(config.repeats):
                fields = {**config.adaptive.to_dict(), **overrides, "confidence": confidence, "seed": seed}
                d = simulate(values, rule, AdaptiveConfig(**fields), known=known)
                recalls.append(len(np.intersect1d(d.selected, truth)) / len(truth))
                fractions.append(d.compute_fraction)
                spearmans.append(metrics_lib.spearman(d.estimate[d.selected], exact[d.selected]))
            rows.append(
                {
                    "metric": metric,
                    "top_fraction": fraction,
                    "golden_size": int(len(truth)),
                    "setting": label,
                    "confidence": confidence,
                    "recall": float(np.mean(recalls)),
                    "recall_min": float(np.min(recalls)),
                    "compute_fraction": float(np.mean(fractions)),
                    "compute_fraction_max": float(np.max(fractions)),
                    "spearman_selected": float(np.nanmean(spearmans)) if np.isfinite(spearmans).any() else None,
                }
            )
            log(
                f"{metric} top {fraction:.0%} {label} {confidence}: recall {rows[-1]['recall']:.3f}, "
                f"compute {rows[-1]['compute_fraction']:.1%}"
            )
    return rows


def real_run(config, workdir: pathlib.Path, pool_path: pathlib.Path, scores: dict, exact_run_json: dict, log) -> dict:
    """One adaptive setting through the engine; its golden set against the exact one and its real cost."""
    from nuggets_jax.scoring import job

    r = config.real_run
    (label, overrides), *_ = parse_settings(r.setting)
    fields = {**config.adaptive.to_dict(), **overrides, "confidence": r.confidence}
    cfg = score_config(
        config,
        pool_path,
        **{f"adaptive.{k}": v for k, v in fields.items()},
        **{"scoring.mode": "adaptive", "metric": r.metric, "select.top_fraction": r.fraction, "report": False},
    )
    out = workdir / r.subdir
    run_path = out / "run.json"
    if run_path.is_file():
        # Reuse a finished run (its run.json has the compute it took); a rerun would only replay it.
        run = _read_json(run_path)
        saved = _read_json(out / "config.json")
        same = {k: run.get("adaptive", {}).get(k) for k in fields} == fields and (
            saved["metric"],
            saved["select"]["top_fraction"],
        ) == (r.metric, r.fraction)
        if not same:
            raise AdaptiveError(
                f"{run_path.parent}: holds an adaptive run of other settings; delete it or change real_run."
            )
        log(f"real run: reusing {run_path}")
    else:
        run = job.run_score(cfg, out, log=log)
    golden = select_lib.read_golden(select_lib.golden_path(out))
    truth = select_lib.SelectionRule(top_fraction=r.fraction).select(_values(r.metric, scores).mean(axis=1))
    truth_ids = {str(scores["candidate_ids"][i]) for i in truth}
    exact_one_shot = exact_run_json.get("one_shot", {})
    exact_s = exact_one_shot.get("wall_s")
    return {
        "setting": f"{r.metric}, top {r.fraction:.0%}, {label}, confidence {r.confidence}",
        "recall": len(truth_ids & {str(g["id"]) for g in golden}) / len(truth_ids),
        "pairs_scored": run.get("pairs_scored"),
        "pairs_exact": run.get("pairs_exact"),
        "compute_fraction": run.get("compute_fraction"),
        # FLOPs of what was computed (prefix re-encoding per round included): unlike time, not load-dependent.
        "flops_fraction": run["one_shot"]["flops"] / exact_one_shot["flops"] if exact_one_shot.get("flops") else None,
        "one_shot_s": run["one_shot"]["wall_s"],
        "exact_one_shot_s": exact_s,
        "time_fraction": run["one_shot"]["wall_s"] / exact_s if exact_s else None,
        "tokens_per_s": run["one_shot"]["tokens_per_s"],
        "exact_tokens_per_s": exact_one_shot.get("tokens_per_s"),
    }


def run_evaluation(config, workdir: str | pathlib.Path, log: Callable[[str], None] = print) -> pathlib.Path:
    """The whole evaluation into `workdir` (configs/adaptive_eval.py); returns the report's path.

    Raises:
      AdaptiveError: a bad `settings` string, an exact run of another pool, or a real-run folder
        of other settings.
    """
    labels = [label for label, _ in parse_settings(config.settings)]  # a bad string fails before any scoring
    if config.real_run.enabled:
        parse_settings(config.real_run.setting)
    workdir = pathlib.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    pool_path = workdir / "pool.json"
    pool = sample_pool(config.pool.source, config.pool.size, config.pool.seed)
    text = json.dumps(pool, ensure_ascii=False, indent=1)
    if not pool_path.is_file() or pool_path.read_text(encoding="utf-8") != text:
        pool_path.write_text(text, encoding="utf-8")
    scores, exact_run_json = exact_run(config, workdir, pool_path, log)
    if scores["one_logp"].shape[0] != len(pool):
        raise AdaptiveError(
            f"{config.exact_workdir or workdir / 'exact'}: holds {scores['one_logp'].shape[0]} candidates, the "
            f"pool sample has {len(pool)}; point --config.exact_workdir at a run of this pool."
        )
    rows = replay(scores, config, log)
    real = real_run(config, workdir, pool_path, scores, exact_run_json, log) if config.real_run.enabled else None
    (workdir / "plots").mkdir(exist_ok=True)
    plot_frontier(rows, config, labels, workdir / "plots" / "adaptive_frontier.png")
    info = {
        "pool": config.pool.source,
        "candidates": len(pool),
        "tasks_source": config.score.data.tasks,
        "tasks": scores["one_logp"].shape[1],
        "model": config.score.model.path,
    }
    (workdir / "results.json").write_text(json.dumps({"info": info, "replay": rows, "real_run": real}, indent=2))
    return write_report(workdir, rows, real, info, config)
