"""Task-set sweeps: config expansion, one scoring run for the union, column subsets equal separate runs."""

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from configs import score as score_config
from configs import sweep_tasksets
from nuggets_jax import metrics
from nuggets_jax.scoring import embedding as embedding
from nuggets_jax.scoring import job as job
from nuggets_jax.synthetic import generate as synthetic
from nuggets_jax.tasksets import sweep as sweep_lib
from nuggets_jax.tasksets import sweep_spec
from tests.conftest import REPO


def test_default_sweep_expands_to_the_grid():
    config = sweep_tasksets.get_config()
    overrides = list(sweep_tasksets.get_sweep(config))
    expected = {
        (c, k, s, m)
        for c in ("kmeans", "random")
        for k in (5, 10, 25, 50, 100)
        for s in (0, 1, 2)
        for m in ("win_rate", "mean_logp_gain")
    }
    assert len(overrides) == len(expected) == 60
    got = {(o["taskset.construction"], o["taskset.k"], o["taskset.seed"], o["metric"]) for o in overrides}
    assert got == expected
    variants = sweep_spec.expand(config, overrides)
    assert len(variants) == 60 and len({v.spec for v in variants}) == 30
    assert all(v.spec.m == 1000 and v.spec.n_init == 10 for v in variants)
    refs = sweep_spec.reference_specs(config, variants)
    assert {m: (s.construction, s.k, s.seed) for m, s in refs.items()} == {
        "win_rate": ("kmeans", 100, 0),
        "mean_logp_gain": ("kmeans", 100, 0),
    }


def test_grid_overrides_and_presets():
    config = sweep_tasksets.get_config("cpu")
    assert len(list(sweep_tasksets.get_sweep(config))) == 2 * 3 * 2 * 2  # constructions x sizes x seeds x metrics
    config.sweep.sizes = (7,)
    config.sweep.metrics = ("token_acc_gain",)
    overrides = list(sweep_tasksets.get_sweep(config))
    assert [(o["taskset.k"], o["metric"]) for o in overrides] == [(7, "token_acc_gain")] * 4
    config = sweep_tasksets.get_config("pool=/data/p.json,candidates=50")
    assert (config.score.data.pool, config.taskset.source, config.pool_sample) == ("/data/p.json", "pool", 50)


def test_expand_rejects_what_cannot_vary():
    config = sweep_tasksets.get_config()
    with pytest.raises(sweep_spec.SweepError, match="'score.metric' cannot vary in a sweep"):
        sweep_spec.expand(config, [{"score.metric": "win_rate"}])
    with pytest.raises(sweep_spec.SweepError, match="appears twice"):
        sweep_spec.expand(config, [{"taskset.k": 5}, {"taskset.k": 5}])
    with pytest.raises(sweep_spec.SweepError, match="unknown metric 'auc'"):
        sweep_spec.expand(config, [{"metric": "auc"}])
    with pytest.raises(sweep_spec.SweepError, match="unknown construction"):
        sweep_spec.expand(config, [{"taskset.construction": "dpp"}])
    with pytest.raises(sweep_spec.SweepError, match="empty"):
        sweep_spec.expand(config, [])
    config.reference = "union"
    variants = sweep_spec.expand(config, [{"taskset.construction": "random", "taskset.k": 5}])
    assert sweep_spec.reference_specs(config, variants) == {"win_rate": None}
    config.reference = "largest"
    with pytest.raises(sweep_spec.SweepError, match="no kmeans variant"):
        sweep_spec.reference_specs(config, variants)


SIZES, SEEDS, METRICS = (3, 6), (0, 1), ("win_rate", "mean_logp_gain")


def _config(tiny_model_dir, inputs):
    config = sweep_tasksets.get_config("runlocal")
    config.score.model.path = str(tiny_model_dir)
    config.score.data.pool = str(inputs / "pool.json")
    config.score.data.max_task_tokens = 64
    config.score.scoring.max_prefix_buckets = 1
    config.score.progress = False
    config.score.report = False
    config.pool_sample = 0
    config.taskset.source = str(inputs / "tasks.json")
    config.taskset.m = 30
    config.sweep.sizes = SIZES
    config.sweep.seeds = SEEDS
    config.sweep.metrics = METRICS
    return config


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model_dir):
    inputs = tmp_path_factory.mktemp("inputs")
    (inputs / "pool.json").write_text(json.dumps(synthetic.generate_pool(12, seed=3)))
    (inputs / "tasks.json").write_text(json.dumps(synthetic.generate_tasks(60, seed=5)))
    config = _config(tiny_model_dir, inputs)
    workdir = tmp_path_factory.mktemp("sweep")
    logs: list[str] = []
    result = sweep_lib.run_sweep(config, sweep_tasksets.get_sweep(config), workdir, log=logs.append)
    with np.load(workdir / "scoring" / "scores.npz") as z:
        scores = {k: z[k] for k in z.files}
    return config, workdir, result, logs, scores


def _union_columns(workdir, name):
    union = [r["taskset"]["pool_id"] for r in json.loads((workdir / "tasks_union.json").read_text())]
    ids = [r["taskset"]["pool_id"] for r in json.loads((workdir / "tasksets" / f"{name}.json").read_text())]
    return np.asarray([union.index(i) for i in ids])


def test_sweep_scores_the_union_once_and_reports(swept):
    config, workdir, result, logs, scores = swept
    n_variants = 2 * len(SIZES) * len(SEEDS) * len(METRICS)
    assert len(result["variants"]) == n_variants
    # The union: every task of every task set, once; scored in one run of that many columns.
    sets = {}
    for path in sorted((workdir / "tasksets").glob("*_s[0-9].json")):
        sets[path.stem] = [r["taskset"]["pool_id"] for r in json.loads(path.read_text())]
    assert len(sets) == 2 * len(SIZES) * len(SEEDS)
    union = {i for ids in sets.values() for i in ids}
    assert scores["one_logp"].shape == (12, len(union))
    assert sorted(map(str, scores["task_ids"])) == sorted(union)
    summed = sum(len(sets[r["taskset"]]) for r in result["variants"])
    assert f"the union of {len(union)} task columns once for 12 candidates, instead of {summed} columns" in "\n".join(
        logs
    )
    # Every variant's numbers, recomputed here from scores.npz and the task-set file.
    tokens = {r["taskset"]: r["task_tokens"] for r in result["variants"]}
    for row in result["variants"]:
        reference = f"kmeans_k{max(SIZES)}_m30_s{min(SEEDS)}"
        assert row["is_reference"] == (row["taskset"] == reference)
        values = metrics.compute_metric(row["metric"], scores, _union_columns(workdir, row["taskset"]))
        ref = metrics.compute_metric(row["metric"], scores, _union_columns(workdir, reference))
        assert row["spearman"] == pytest.approx(stats.spearmanr(values, ref).statistic, nan_ok=True)
        assert row["tasks"] == len(sets[row["taskset"]])
        assert row["shared_with_reference"] == len(set(sets[row["taskset"]]) & set(sets[reference]))
        assert row["cost_tokens"] == row["task_tokens"] * 12
        assert row["cost_vs_reference"] == pytest.approx(row["task_tokens"] / tokens[reference])
    report = (workdir / "report.md").read_text()
    table = report.split("## Every variant")[1]
    assert len(re.findall(r"^\| (kmeans|random)_k", table, flags=re.M)) == n_variants
    summary = report.split("## Stability by task-set size")[1].split("## Plots")[0]
    # One summary row per (construction, K, metric), the reference variant left out of its group.
    assert len(re.findall(r"^\| (kmeans|random) \|", summary, flags=re.M)) == 2 * len(SIZES) * len(METRICS)
    for png in ("correlation_vs_size.png", "top_overlap_vs_size.png", "metric_correlation.png"):
        assert (workdir / "plots" / png).stat().st_size > 1000
    assert json.loads((workdir / "stability.json").read_text())["counts"]["union_columns"] == len(union)


def test_column_subset_equals_a_separate_run_on_the_subset(swept, tmp_path):
    config, workdir, _, _, scores = swept
    name = f"kmeans_k{max(SIZES)}_m30_s{max(SEEDS)}"
    separate = copy.deepcopy(config.score)
    separate.data.tasks = str(workdir / "tasksets" / f"{name}.json")  # a task-set file is a task file
    separate.data.pool = config.score.data.pool
    job.run_score(separate, tmp_path / "subset", log=lambda m: None)
    with np.load(tmp_path / "subset" / "scores.npz") as z:
        alone = {k: z[k] for k in z.files}
    columns = _union_columns(workdir, name)
    assert [str(t) for t in alone["task_ids"]] == [str(t) for t in scores["task_ids"][columns]]
    np.testing.assert_allclose(alone["one_logp"], scores["one_logp"][:, columns], rtol=1e-5, atol=1e-5)
    subset = metrics.compute_all(scores, columns)
    direct = metrics.compute_all(alone)
    for name in ("mean_logp_gain", "token_acc_gain"):
        np.testing.assert_allclose(subset[name], direct[name], rtol=1e-5, atol=1e-5)
    # A perplexity drop is a difference of two perplexities: its float32 noise scales with them.
    ppl_scale = np.exp(-alone["zero_logp"] / alone["n_tokens"]).max()
    np.testing.assert_allclose(subset["mean_ppl_drop"], direct["mean_ppl_drop"], rtol=1e-5, atol=1e-5 * ppl_scale)
    # A win flips only where one-shot and zero-shot log-probs tie within float32 noise.
    margin = np.abs(scores["one_logp"][:, columns] - scores["zero_logp"][columns]).min(axis=1)
    clear = margin > 1e-3
    assert clear.sum() >= 6
    np.testing.assert_array_equal(subset["win_rate"][clear], direct["win_rate"][clear])


def test_rerun_reuses_task_sets_and_scores(swept):
    config, workdir, result, _, _ = swept
    stamps = {p.name: p.stat().st_mtime_ns for p in (workdir / "tasksets").iterdir()}
    logs: list[str] = []
    again = sweep_lib.run_sweep(config, sweep_tasksets.get_sweep(config), workdir, log=logs.append)
    text = "\n".join(logs)
    assert "reusing scores.npz" in text and "built" not in text
    assert {p.name: p.stat().st_mtime_ns for p in (workdir / "tasksets").iterdir()} == stamps
    assert json.dumps(again["variants"]) == json.dumps(result["variants"])
    assert result["scoring_reused_candidates"] == 0 and again["scoring_reused_candidates"] == 12
    assert "(12 of 12 candidates scored by an earlier run)" in (workdir / "report.md").read_text()


def test_sweep_cli_refuses_an_override_that_needs_rescoring(tmp_path):
    path = tmp_path / "bad_sweep.py"
    path.write_text(
        "from configs.sweep_tasksets import get_config\n\n\ndef get_sweep(config):\n"
        "    yield {'score.data.max_task_tokens': 64}\n"
    )
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "experiments.sweep", f"--config={path}", f"--workdir={tmp_path / 'w'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "'score.data.max_task_tokens' cannot vary in a sweep" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_score_config_is_the_scoring_config():
    # The sweep embeds configs/score.py, so every scoring field is there to override.
    assert sweep_tasksets.get_config().score.to_dict() == score_config.get_config().to_dict() | {"report": True}
    assert embedding.EmbeddingConfig(**sweep_tasksets.get_config().taskset.embedding.to_dict())
