r"""Adaptive vs exact scoring on the same pool: recall of the exact golden set against compute.

  python -m experiments.adaptive_eval --config=configs/adaptive_eval.py --workdir=workdirs/adaptive_eval \
      --config.pool.source=../shared/data/alpagasus/random_9k.json \
      --config.score.data.tasks=../shared/data/nuggets/alpaca_gpt4_kmeans_100.json

Scores the pool exactly once (or reuses DIR/exact/scores.npz), replays every adaptive setting
offline on the exact per-(candidate, task) values (the rule needs nothing else, so the replay makes
exactly the decisions a real run would), and writes DIR/report.md, DIR/results.json and
DIR/plots/. With --config.real_run.enabled=True one setting also runs through the engine into
DIR/adaptive, for the compute it really saves.
"""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/adaptive_eval.py", "Experiment config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; the exact run is reused).", required=True)


def sample_pool(source: str, size: int, seed: int) -> list[dict]:
    """A seeded sample of `size` records with a non-empty instruction and output (all when size is 0)."""
    from nuggets_jax import synthetic

    if source == "default":
        objects = synthetic.generate_pool()
    else:
        path = pathlib.Path(source).expanduser()
        text = path.read_text(encoding="utf-8")
        objects = (
            json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    keep = [o for o in objects if str(o.get("instruction", "")).strip() and str(o.get("output", "")).strip()]
    if not size or size >= len(keep):
        return keep
    index = np.sort(np.random.default_rng(seed).choice(len(keep), size, replace=False))
    return [keep[i] for i in index]


def score_config(config, pool_path: pathlib.Path, **changes):
    """configs/score.py with this experiment's overrides (config.score) and `changes` ("a.b": value)."""
    from configs import score

    cfg = score.get_config()
    flat = {**_flatten(config.score.to_dict()), **changes}
    for dotted, value in flat.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    cfg.data.pool = str(pool_path)
    cfg.progress = False
    return cfg


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def exact_run(config, workdir: pathlib.Path, pool_path: pathlib.Path) -> tuple[dict, dict]:
    """scores.npz and run.json of the exact run (scored now unless they exist)."""
    from nuggets_jax.scoring import job as job

    exact_dir = pathlib.Path(config.exact_workdir or workdir / "exact")
    if not (exact_dir / "scores.npz").is_file():
        cli.log(f"exact run into {exact_dir} (reruns resume it)")
        job.run_score(score_config(config, pool_path, report=False), exact_dir, log=cli.log)
    with np.load(exact_dir / "scores.npz") as z:
        scores = {k: z[k] for k in z.files}
    run = json.loads((exact_dir / "run.json").read_text()) if (exact_dir / "run.json").is_file() else {}
    return scores, run


def parse_settings(text: str) -> list[tuple[str, dict]]:
    """ "betting,joint; normal,candidate,panel=8" -> [(label, adaptive.* overrides), ...]."""
    settings = []
    for item in text.split(";"):
        parts = [p.strip() for p in item.split(",") if p.strip()]
        if not parts:
            continue
        if len(parts) < 2 or parts[0] not in ("betting", "normal") or parts[1] not in ("joint", "candidate"):
            raise ValueError(
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


def replay(scores: dict, config) -> list[dict]:
    """Every (metric, golden fraction, setting, confidence), averaged over task permutations."""
    from nuggets_jax import select
    from nuggets_jax.scoring import report as report
    from nuggets_jax.scoring.adaptive.config import AdaptiveConfig
    from nuggets_jax.scoring.adaptive.intervals import known_range, per_task_values
    from nuggets_jax.scoring.adaptive.rule import simulate, target_rule

    rows = []
    c = scores["one_logp"].shape[0]
    for metric in config.metrics:
        values = per_task_values(
            metric,
            scores["one_logp"],
            scores["one_correct"],
            scores["zero_logp"],
            scores["zero_correct"],
            scores["n_tokens"],
        )
        known = known_range(metric, scores["zero_logp"], scores["zero_correct"], scores["n_tokens"])
        exact = values.mean(axis=1)
        combos = itertools.product(config.fractions, parse_settings(config.settings), config.confidences)
        for fraction, (label, overrides), confidence in combos:
            truth = select.select(exact, top_fraction=fraction)
            rule = target_rule(c, top_fraction=fraction)
            recalls, fractions, spearmans = [], [], []
            for seed in range(config.repeats):
                fields = {**config.adaptive.to_dict(), **overrides, "confidence": confidence, "seed": seed}
                d = simulate(values, rule, AdaptiveConfig(**fields), known=known)
                recalls.append(len(np.intersect1d(d.selected, truth)) / len(truth))
                fractions.append(d.compute_fraction)
                spearmans.append(report.spearman(d.estimate[d.selected], exact[d.selected]))
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
            cli.log(
                f"{metric} top {fraction:.0%} {label} {confidence}: recall {rows[-1]['recall']:.3f}, "
                f"compute {rows[-1]['compute_fraction']:.1%}"
            )
    return rows


def real_run(config, workdir: pathlib.Path, pool_path: pathlib.Path, scores: dict, exact_run_json: dict) -> dict:
    """One adaptive setting through the engine; its golden set against the exact one and its real cost."""
    from configs import score
    from nuggets_jax import select
    from nuggets_jax.scoring import job as job
    from nuggets_jax.scoring.adaptive.intervals import per_task_values

    if "mode" not in score.get_config().scoring:
        raise ValueError(
            "configs/score.py has no scoring.mode yet (the adaptive mode is not wired into the job); "
            "run with --config.real_run.enabled=False"
        )
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
        run = json.loads(run_path.read_text())
        saved = json.loads((out / "config.json").read_text())
        same = {k: run.get("adaptive", {}).get(k) for k in fields} == fields and (
            saved["metric"],
            saved["select"]["top_fraction"],
        ) == (r.metric, r.fraction)
        if not same:
            raise ValueError(
                f"{run_path.parent}: holds an adaptive run of other settings; delete it or change real_run."
            )
        cli.log(f"real run: reusing {run_path}")
    else:
        run = job.run_score(cfg, out, log=cli.log)
    golden = json.loads((out / "golden.json").read_text())
    values = per_task_values(
        r.metric,
        scores["one_logp"],
        scores["one_correct"],
        scores["zero_logp"],
        scores["zero_correct"],
        scores["n_tokens"],
    )
    truth = select.select(values.mean(axis=1), top_fraction=r.fraction)
    truth_ids = {str(scores["candidate_ids"][i]) for i in truth}
    exact_s = exact_run_json.get("one_shot", {}).get("wall_s")
    return {
        "setting": f"{r.metric}, top {r.fraction:.0%}, {label}, confidence {r.confidence}",
        "recall": len(truth_ids & {str(g["id"]) for g in golden}) / len(truth_ids),
        "pairs_scored": run.get("pairs_scored"),
        "pairs_exact": run.get("pairs_exact"),
        "compute_fraction": run.get("compute_fraction"),
        # FLOPs of what was computed (prefix re-encoding per round included): unlike time, not load-dependent.
        "flops_fraction": run["one_shot"]["flops"] / exact_run_json["one_shot"]["flops"]
        if exact_run_json.get("one_shot", {}).get("flops")
        else None,
        "one_shot_s": run["one_shot"]["wall_s"],
        "exact_one_shot_s": exact_s,
        "time_fraction": run["one_shot"]["wall_s"] / exact_s if exact_s else None,
        "tokens_per_s": run["one_shot"]["tokens_per_s"],
        "exact_tokens_per_s": exact_run_json.get("one_shot", {}).get("tokens_per_s"),
    }


def plot(rows: list[dict], config, path: pathlib.Path) -> None:
    """Recall against compute: one panel per (metric, golden fraction), one line per setting over confidences."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics, fractions = list(config.metrics), list(config.fractions)
    labels = [label for label, _ in parse_settings(config.settings)]
    figure = Figure(figsize=(4.2 * len(fractions), 3.6 * len(metrics)))
    FigureCanvasAgg(figure)
    for i, metric in enumerate(metrics):
        for j, fraction in enumerate(fractions):
            axes = figure.add_subplot(len(metrics), len(fractions), i * len(fractions) + j + 1)
            for k, label in enumerate(labels):
                pts = [r for r in rows if (r["metric"], r["top_fraction"], r["setting"]) == (metric, fraction, label)]
                pts.sort(key=lambda r: r["confidence"])
                x, y = [p["compute_fraction"] for p in pts], [p["recall"] for p in pts]
                axes.plot(x, y, marker="o^sDv"[k % 5], color=f"C{k}", label=label)
                for p in pts:
                    axes.annotate(f"{p['confidence']:g}", (p["compute_fraction"], p["recall"]), fontsize=6)
            if fraction == 0.1:
                axes.axvline(config.target_fraction, color="grey", linestyle=":")
                axes.axhline(config.target_recall, color="grey", linestyle=":")
            axes.set_xlim(0, 1.02)
            axes.set_xlabel("pairs scored / exact pairs")
            axes.set_ylabel("recall of the exact golden set")
            axes.set_title(f"{metric}, top {fraction:.0%}", fontsize=9)
            axes.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})


def write_report(workdir: pathlib.Path, rows: list[dict], real: dict | None, info: dict, config) -> pathlib.Path:
    lines = [
        "# Adaptive scoring vs exact scoring\n",
        f"Pool: {info['pool']} ({info['candidates']} candidates), tasks: {info['tasks_source']} "
        f"({info['tasks']} tasks), model: {info['model']}. Each adaptive setting is replayed on the exact "
        f"run's per-(candidate, task) values for {config.repeats} task permutation(s); numbers are means "
        "over permutations (recall min = worst permutation). Rounds: "
        f"{config.adaptive.initial_tasks} tasks for everyone, then {config.adaptive.tasks_per_round} per round.\n",
        "Settings: the interval (`betting`: exact confidence sequence; `normal`: Student-t with the "
        "finite-population correction), the guarantee (`joint`: the confidence holds for every decision of the run "
        "together, a union bound over candidates; `candidate`: each candidate's interval on its own), and any other "
        "adaptive.* field (`panel=P`: P reference candidates scored in every round, intervals relative to them). "
        "Compute fraction = pairs scored / exact pairs (the panel's included).\n",
        "| metric | golden set | setting | confidence | recall | recall min | compute fraction | "
        "Spearman on the selected set |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = "n/a" if r["spearman_selected"] is None else f"{r['spearman_selected']:.3f}"
        lines.append(
            f"| {r['metric']} | top {r['top_fraction']:.0%} ({r['golden_size']}) | {r['setting']} | "
            f"{r['confidence']:g} | {r['recall']:.3f} | {r['recall_min']:.3f} | {r['compute_fraction']:.1%} | {sp} |"
        )
    goal = [
        r
        for r in rows
        if r["top_fraction"] == 0.1
        and r["recall"] >= config.target_recall
        and r["compute_fraction"] <= config.target_fraction
    ]
    lines.append(
        f"\nTarget (exact top-10% recall >= {config.target_recall} at <= {config.target_fraction:.0%} of the pairs): "
        + (
            "met by " + ", ".join(f"{r['metric']} {r['setting']} at confidence {r['confidence']:g}" for r in goal)
            if goal
            else "not met by any setting here."
        )
        + "\n"
    )
    lines.append("![recall against compute](plots/adaptive_frontier.png)\n")
    if real:
        lines += [
            "## A real adaptive run through the engine\n",
            f"Setting {real['setting']}: recall of the exact golden set {real['recall']:.3f}, "
            f"{real['pairs_scored']} of {real['pairs_exact']} pairs ({real['compute_fraction']:.1%}), "
            f"{real['flops_fraction'] or float('nan'):.1%} of the exact run's model FLOPs; one-shot "
            f"time {real['one_shot_s']:.0f} s against {real['exact_one_shot_s'] or float('nan'):.0f} s exact "
            f"({real['time_fraction'] or float('nan'):.1%}); {real['tokens_per_s']:.0f} task tokens/s "
            f"(exact {real['exact_tokens_per_s'] or float('nan'):.0f}). The two runs may have shared the "
            "machine with other work; compare time fractions with care.\n",
        ]
    path = workdir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value).expanduser()
    with cli.user_errors():
        workdir.mkdir(parents=True, exist_ok=True)
        pool_path = workdir / "pool.json"
        pool = sample_pool(config.pool.source, config.pool.size, config.pool.seed)
        text = json.dumps(pool, ensure_ascii=False, indent=1)
        if not pool_path.is_file() or pool_path.read_text(encoding="utf-8") != text:
            pool_path.write_text(text, encoding="utf-8")
        scores, exact_run_json = exact_run(config, workdir, pool_path)
        if scores["one_logp"].shape[0] != len(pool):
            raise ValueError(
                f"{config.exact_workdir or workdir / 'exact'}: holds {scores['one_logp'].shape[0]} candidates, the "
                f"pool sample has {len(pool)}; point --config.exact_workdir at a run of this pool."
            )
        rows = replay(scores, config)
        real = real_run(config, workdir, pool_path, scores, exact_run_json) if config.real_run.enabled else None
        (workdir / "plots").mkdir(exist_ok=True)
        plot(rows, config, workdir / "plots" / "adaptive_frontier.png")
        info = {
            "pool": config.pool.source,
            "candidates": len(pool),
            "tasks_source": config.score.data.tasks,
            "tasks": scores["one_logp"].shape[1],
            "model": config.score.model.path,
        }
        (workdir / "results.json").write_text(json.dumps({"info": info, "replay": rows, "real_run": real}, indent=2))
        path = write_report(workdir, rows, real, info, config)
        cli.log(f"report: {path}")


if __name__ == "__main__":
    cli.run(main)
