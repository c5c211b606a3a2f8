"""Adaptive scoring: the interval's coverage, the top-N rule's promise, and the round loop on a tiny model."""

import json
import math
import types

import numpy as np
import pytest

from nuggets_jax import data as D
from nuggets_jax import metrics, select, store
from nuggets_jax.models import load_model
from nuggets_jax.scoring import engine as scoring
from nuggets_jax.scoring import one_shot as one_shot
from nuggets_jax.scoring.adaptive import rounds as adaptive
from nuggets_jax.scoring.adaptive.config import METRICS, AdaptiveConfig, AdaptiveError, round_columns, visit_order
from nuggets_jax.scoring.adaptive.intervals import confidence_interval, known_range, normal_interval, per_task_values
from nuggets_jax.scoring.adaptive.rule import ACTIVE, IN, OUT, Rule, simulate, target_rule
from nuggets_jax.synthetic import generate as synthetic


def exact_top(values, n):
    """Exact top-n of per-task values [C, T]: by mean, ties by position (select.rank_order)."""
    return set(np.argsort(-values.mean(axis=1), kind="stable")[:n].tolist())


def binomial_floor(p, trials, sds=3.0):
    """Successes a rule right with probability >= p reaches except with tiny probability."""
    return p * trials - sds * math.sqrt(p * (1 - p) * trials)


# -- the pieces ------------------------------------------------------------------------------------


def test_rounds_partition_a_seeded_permutation():
    cfg = AdaptiveConfig(tasks_per_round=7, seed=3)
    rounds = round_columns(30, cfg)
    assert [len(r) for r in rounds] == [7, 7, 7, 7, 2]
    assert sorted(np.concatenate(rounds).tolist()) == list(range(30))
    again = round_columns(30, AdaptiveConfig(tasks_per_round=7, seed=3))
    other = round_columns(30, AdaptiveConfig(tasks_per_round=7, seed=4))
    assert all(np.array_equal(a, b) for a, b in zip(rounds, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(rounds, other, strict=True))


@pytest.mark.parametrize("metric", METRICS)
def test_per_task_values_average_to_the_metric(metric):
    rng = np.random.default_rng(0)
    c, t = 5, 9
    scores = {
        "zero_logp": -rng.uniform(5, 30, t),
        "zero_correct": rng.integers(0, 4, t),
        "n_tokens": rng.integers(4, 9, t),
        "one_logp": -rng.uniform(5, 30, (c, t)).astype(np.float32),
        "one_correct": rng.integers(0, 4, (c, t)),
    }
    values = per_task_values(
        metric,
        scores["one_logp"],
        scores["one_correct"],
        scores["zero_logp"],
        scores["zero_correct"],
        scores["n_tokens"],
    )
    np.testing.assert_allclose(values.mean(axis=1), metrics.compute_metric(metric, scores), rtol=1e-13, atol=0)
    low, high = known_range(metric, scores["zero_logp"], scores["zero_correct"], scores["n_tokens"])
    assert (low is None or values.min() >= low) and (high is None or values.max() <= high)
    assert (low is None) == (high is None) == (metric == "mean_logp_gain")


def test_interval_covers_the_finite_population_mean_at_every_round():
    """Time-uniform coverage over paths without replacement, for binary and continuous populations."""
    rng = np.random.default_rng(1)
    t, rows, alpha = 40, 300, 0.1
    populations = {
        "binary": (rng.random((rows, t)) < rng.uniform(0.05, 0.95, (rows, 1))).astype(float),
        "skewed": np.clip(rng.exponential(0.15, (rows, t)) * rng.uniform(0.2, 2, (rows, 1)), 0, 1),
    }
    for name, pop in populations.items():
        mean = pop.mean(axis=1)
        path = np.take_along_axis(pop, np.argsort(rng.random((rows, t)), axis=1), axis=1)  # a random order per row
        ever_missed = np.zeros(rows, bool)
        widths = {}
        for n in range(4, t + 1, 4):
            lower, upper = confidence_interval(path[:, :n], t, alpha, 0.0, 1.0, grid=101)
            ever_missed |= (mean < lower - 1e-12) | (mean > upper + 1e-12)
            # Never wider than what the range alone allows for the unseen values.
            seen = path[:, :n].sum(axis=1)
            assert (lower >= seen / t - 1e-12).all() and (upper <= (seen + t - n) / t + 1e-12).all()
            widths[n] = float((upper - lower).mean())
        assert ever_missed.mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / rows), name
        assert widths[t] == 0.0  # every task seen: the exact mean
        # It learns from the data: half way it is well inside the range-only window (width 1 - n/T).
        assert widths[t // 2] < 0.8 * (1 - (t // 2) / t), name


def test_interval_scales_with_the_range():
    rng = np.random.default_rng(2)
    values = rng.uniform(0, 1, (3, 10))
    lo, hi = confidence_interval(values, 30, 0.05, 0.0, 1.0, grid=51)
    lo2, hi2 = confidence_interval(values * 4 - 2, 30, 0.05, -2.0, 2.0, grid=51)
    np.testing.assert_allclose(lo2, lo * 4 - 2, atol=1e-9)
    np.testing.assert_allclose(hi2, hi * 4 - 2, atol=1e-9)


# -- the rule --------------------------------------------------------------------------------------


def _known_means_matrix(rng, c, t, kind):
    means = np.sort(rng.uniform(0.1, 0.9, c))[::-1]
    rng.shuffle(means)
    if kind == "binary":
        return (rng.random((c, t)) < means[:, None]).astype(float)
    return np.clip(means[:, None] + rng.normal(0, 0.15, (c, t)), 0, 1)


@pytest.mark.parametrize(
    "kind, interval, compare",
    [
        ("binary", "betting", "candidate"),
        ("continuous", "betting", "candidate"),
        ("binary", "normal", "candidate"),
        ("continuous", "normal", "candidate"),
        ("binary", "normal", "pairwise"),
        ("continuous", "normal", "pairwise"),
    ],
)
def test_rule_returns_the_true_top_n_at_the_promised_rate(kind, interval, compare):
    rng = np.random.default_rng(len(kind) + 10 * len(interval) + 100 * len(compare))
    c, t, n, reps, confidence = 30, 40, 3, 200, 0.9
    cfg = AdaptiveConfig(
        confidence=confidence, tasks_per_round=4, initial_tasks=4, grid=61, interval=interval, compare=compare
    )
    rule = target_rule(c, top_n=n)
    known = (0.0, 1.0) if kind == "binary" else (None, None)  # continuous: the range is assumed from data
    right, fractions = 0, []
    for rep in range(reps):
        values = _known_means_matrix(rng, c, t, kind)
        d = simulate(values, rule, dataclasses_replace(cfg, seed=rep), known=known)
        right += set(d.selected.tolist()) == exact_top(values, n)
        fractions.append(d.compute_fraction)
        assert len(d.selected) == n and (d.status != ACTIVE).all()
    assert right >= binomial_floor(confidence, reps), f"{right}/{reps}"
    assert np.mean(fractions) < 0.9  # it does skip work on well-spread candidates


def test_normal_interval_coverage_without_replacement():
    rng = np.random.default_rng(7)
    t, rows, alpha = 60, 2000, 0.1
    pop = rng.normal(rng.uniform(-1, 1, (rows, 1)), 0.3, (rows, t)) + rng.normal(0, 0.2, t)  # task effects too
    path = np.take_along_axis(pop, np.argsort(rng.random((rows, t)), axis=1), axis=1)
    mean = pop.mean(axis=1)
    for n in (15, 30, 45):
        lower, upper = normal_interval(path[:, :n], t, alpha)
        missed = ((mean < lower) | (mean > upper)).mean()
        assert missed <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / rows), (n, missed)
        assert missed >= alpha / 3, (n, missed)  # not vacuous: it is about as wide as it may be
    lower, upper = normal_interval(path, t, alpha)
    np.testing.assert_allclose(lower, mean)
    np.testing.assert_allclose(upper, mean)


def test_panel_and_pairwise_remove_the_shared_task_difficulty():
    """Candidate effect + task effect + noise: compared in pairs, far fewer tasks decide the same set."""
    rng = np.random.default_rng(8)
    c, t, n = 150, 60, 15
    values = rng.normal(0, 0.1, (c, 1)) + rng.normal(0, 0.5, (1, t)) + rng.normal(0, 0.1, (c, t))
    rule = Rule(top_n=n)
    cfg = AdaptiveConfig(confidence=0.9, tasks_per_round=5, initial_tasks=5, interval="normal")
    plain = simulate(values, rule, cfg, known=(None, None))
    paired = simulate(values, rule, dataclasses_replace(cfg, panel=8), known=(None, None))
    truth = exact_top(values, n)
    assert set(plain.selected.tolist()) == truth and set(paired.selected.tolist()) == truth
    assert paired.compute_fraction < 0.7 * plain.compute_fraction
    assert len(paired.panel) == 8 and (paired.tasks_scored[paired.panel] == paired.tasks_scored.max()).all()
    # Estimates and intervals come back on the metric's scale.
    assert np.all(paired.lower <= paired.estimate + 1e-9) and np.all(paired.estimate <= paired.upper + 1e-9)
    full = paired.tasks_scored == t
    np.testing.assert_allclose(paired.estimate[full], values[full].mean(axis=1))
    with pytest.raises(AdaptiveError, match="panel"):
        simulate(values, Rule(threshold=0.0), dataclasses_replace(cfg, panel=8), known=(None, None))
    # Pairwise intervals of differences pair candidates directly (no panel needed) and need fewer tasks still.
    pairwise = simulate(values, rule, dataclasses_replace(cfg, compare="pairwise"), known=(None, None))
    assert set(pairwise.selected.tolist()) == truth
    assert pairwise.compute_fraction < 0.7 * plain.compute_fraction


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_threshold_rule_and_top_fraction():
    rng = np.random.default_rng(5)
    c, t = 40, 30
    values = _known_means_matrix(rng, c, t, "binary")
    cfg = AdaptiveConfig(confidence=0.9, tasks_per_round=5, initial_tasks=5, grid=61)
    d = simulate(values, Rule(threshold=0.5), cfg)
    assert set(d.selected.tolist()) == set(np.flatnonzero(values.mean(axis=1) >= 0.5).tolist())
    rule = target_rule(c, top_fraction=0.1)
    assert rule.top_n == len(select.select(values.mean(axis=1), top_fraction=0.1)) == 4


def test_golden_set_keeps_its_size_when_intervals_fail():
    """At a silly confidence many intervals miss; the rule still returns exactly N, never more in or out."""
    rng = np.random.default_rng(9)
    cfg = AdaptiveConfig(confidence=0.3, union=False, interval="normal", tasks_per_round=2, initial_tasks=2)
    for rep in range(40):
        values = _known_means_matrix(rng, 25, 20, "binary")
        d = simulate(values, Rule(top_n=5), dataclasses_replace(cfg, seed=rep))
        assert len(d.selected) == 5 and (d.status == IN).sum() == 5 and (d.status == OUT).sum() == 20


def test_ties_at_the_boundary_resolve_by_position_after_all_tasks():
    values = np.tile(np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]), (6, 1))  # six identical candidates
    values[5, :] = 0.0  # one clearly worse
    d = simulate(values, Rule(top_n=2), AdaptiveConfig(tasks_per_round=2, initial_tasks=2))
    assert d.selected.tolist() == [0, 1]  # exact ranking: equal values, lower position first
    assert (d.tasks_scored[:5] == 6).all() and set(d.how[:5]) == {"exact"}


def test_decisions_only_read_the_rounds_a_candidate_took_part_in():
    rng = np.random.default_rng(6)
    values = _known_means_matrix(rng, 25, 30, "binary")
    cfg = AdaptiveConfig(confidence=0.8, tasks_per_round=3, initial_tasks=3, grid=61)
    d = simulate(values, Rule(top_n=3), cfg)
    hidden = values.copy()
    order = visit_order(30, cfg)
    for i, n in enumerate(d.tasks_scored):
        hidden[i, order[n:]] = np.nan  # what an adaptive run stores
    d2 = simulate(hidden, Rule(top_n=3), cfg)
    assert np.array_equal(d.selected, d2.selected) and np.array_equal(d.tasks_scored, d2.tasks_scored)
    assert d.compute_fraction < 1.0
    with pytest.raises(AdaptiveError, match="lack scores"):
        hidden[d.status == IN] = np.nan
        simulate(hidden, Rule(top_n=3), cfg)


# -- the round loop through the engine ------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    pool = D.records_from_objects([(f"p[{i}]", o) for i, o in enumerate(synthetic.generate_pool(20, seed=5))], "p")
    task_records = D.records_from_objects(
        [(f"t[{i}]", o) for i, o in enumerate(synthetic.generate_tasks(16, seed=6))], "t", "tasks"
    )
    tasks = D.tokenize_tasks(loaded.tokenizer, task_records, D.Template(), D.TokenPolicy())
    prefixes = D.tokenize_prefixes(loaded.tokenizer, pool, D.Template(), D.TokenPolicy())
    cfg = AdaptiveConfig(confidence=0.5, tasks_per_round=4, initial_tasks=4, grid=61)
    engine = scoring.Engine(
        loaded.model,
        tasks,
        scoring.prefix_lengths_of(prefixes),
        scoring.EngineConfig(candidates_per_device=1, max_prefix_buckets=2),
        log=lambda m: None,
        column_sets=round_columns(len(tasks.ids), cfg),
    )
    zero_logp, zero_correct, _ = engine.zero_shot(prefixes.zero_shot)
    return dict(
        loaded=loaded,
        engine=engine,
        tasks=tasks,
        prefixes=prefixes,
        cfg=cfg,
        zero=(zero_logp, zero_correct, tasks.n_tokens),
        ids=[r.id for r in pool],
        task_ids=[r.id for r in task_records],
        records=[{**r.raw, "id": r.id} for r in pool],
    )


def _run(s, workdir, rule=None, **kw):
    return adaptive.run_adaptive(
        s["engine"],
        s["prefixes"],
        store.ScoreStore(workdir),
        s["ids"],
        s["task_ids"],
        *s["zero"],
        metric=kw.pop("metric", "win_rate"),
        rule=rule or Rule(top_n=3),
        config=kw.pop("config", s["cfg"]),
        chunk_candidates=4,
        progress=False,
        log=lambda m: None,
        **kw,
    )


def _exact(s, workdir):
    return one_shot.run_one_shot(
        s["engine"], s["prefixes"], store.ScoreStore(workdir), s["ids"], s["task_ids"], 4, False, lambda m: None
    )


@pytest.mark.parametrize("metric, rule", [("win_rate", Rule(top_n=3)), ("mean_logp_gain", Rule(threshold=-0.5))])
def test_adaptive_run_completed_equals_a_direct_exact_run(setup, tmp_path, metric, rule):
    s = setup
    result = _run(s, tmp_path / "a", rule, metric=metric)
    d = result.decisions
    assert d.compute_fraction < 1.0, "the tiny pool should let the rule skip some pairs"
    stored = ~np.isnan(result.one_logp)
    # It stores exactly the pairs the rule saw: each candidate's first tasks_scored tasks in visit order.
    order = visit_order(len(s["task_ids"]), s["cfg"])
    for i, n in enumerate(d.tasks_scored):
        assert stored[i, order[:n]].all() and not stored[i, order[n:]].any()
    assert result.stats.pairs == d.pairs_scored == stored.sum()
    direct = _exact(s, tmp_path / "exact")
    # The decisions are those of the rule on the exact scores, and the golden set is the exact one.
    values = per_task_values(metric, direct.one_logp, direct.one_correct, *s["zero"])
    replay = simulate(values, rule, s["cfg"], known=known_range(metric, *s["zero"]))
    assert np.array_equal(replay.tasks_scored, d.tasks_scored) and np.array_equal(replay.selected, d.selected)

    stats = adaptive.complete(
        s["engine"],
        s["prefixes"],
        store.ScoreStore(tmp_path / "a"),
        s["ids"],
        s["task_ids"],
        s["cfg"],
        4,
        False,
        lambda m: None,
    )
    assert stats.pairs == (~stored).sum()
    completed = _exact(s, tmp_path / "a")
    assert completed.stats.pairs == 0 and completed.resumed_candidates == len(s["ids"])
    np.testing.assert_allclose(completed.one_logp, direct.one_logp, atol=1e-5, rtol=1e-6)
    np.testing.assert_array_equal(completed.one_correct, direct.one_correct)
    np.testing.assert_allclose(completed.one_logp.sum(axis=1), direct.one_logp.sum(axis=1), rtol=1e-6)


def test_resume_after_interruption_makes_the_same_decisions(setup, tmp_path, monkeypatch):
    s = setup
    whole = _run(s, tmp_path / "whole")
    calls = {"n": 0}
    original = adaptive._RoundScorer.score

    def dies_on_third_round(self, r, cols, candidates):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, r, cols, candidates)

    monkeypatch.setattr(adaptive._RoundScorer, "score", dies_on_third_round)
    with pytest.raises(KeyboardInterrupt):
        _run(s, tmp_path / "resumed")
    monkeypatch.setattr(adaptive._RoundScorer, "score", original)
    resumed = _run(s, tmp_path / "resumed")
    a, b = whole.decisions, resumed.decisions
    for field in ("status", "tasks_scored", "selected", "decided_round"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    np.testing.assert_allclose(b.lower, a.lower, atol=1e-6)
    np.testing.assert_allclose(b.upper, a.upper, atol=1e-6)
    assert resumed.resumed_candidates == len(s["ids"])  # round 0 was stored for everyone
    assert resumed.stats.pairs < whole.stats.pairs  # only the rounds not stored were scored again


def test_outputs(setup, tmp_path):
    s = setup
    result = _run(s, tmp_path)
    d = result.decisions
    extra = adaptive.write_outputs(tmp_path, s["records"], d, "win_rate", s["cfg"], Rule(top_n=3))
    assert extra["pairs_scored"] == int(d.tasks_scored.sum())
    assert extra["pairs_exact"] == len(s["ids"]) * len(s["task_ids"])
    assert extra["compute_fraction"] == pytest.approx(extra["pairs_scored"] / extra["pairs_exact"])
    json.dumps(extra)  # run.json must be able to hold it
    golden = json.loads((tmp_path / "golden.json").read_text())
    assert [g["id"] for g in golden] == [s["ids"][i] for i in d.selected]
    for g in golden:
        i = s["ids"].index(g["id"])
        assert g["nuggets"]["win_rate"] == pytest.approx(d.estimate[i])
        assert g["nuggets"]["adaptive_lower"] <= g["nuggets"]["win_rate"] <= g["nuggets"]["adaptive_upper"]
    rows = [json.loads(line) for line in (tmp_path / "adaptive.jsonl").read_text().splitlines()]
    assert len(rows) == len(s["ids"]) and {r["status"] for r in rows} <= {"in", "out"}
    assert sum(r["status"] == "in" for r in rows) == 3
    assert sum(r["tasks_scored"] for r in rows) == extra["pairs_scored"]


def test_errors(setup, tmp_path):
    s = setup
    plain = types.SimpleNamespace(num_tasks=len(s["task_ids"]), subset_layouts=[])  # an Engine without rounds
    with pytest.raises(AdaptiveError, match="column_sets"):
        adaptive.run_adaptive(
            plain,
            s["prefixes"],
            store.ScoreStore(tmp_path / "x"),
            s["ids"],
            s["task_ids"],
            *s["zero"],
            "win_rate",
            Rule(top_n=2),
            s["cfg"],
            progress=False,
            log=lambda m: None,
        )
    with pytest.raises(AdaptiveError, match="supports metric"):
        _run(s, tmp_path / "y", metric="mean_ppl_drop")
    _run(s, tmp_path / "z")
    other = dataclasses_replace(s["cfg"], seed=1)
    with pytest.raises(AdaptiveError, match="other task columns"):
        adaptive.check_store_rounds(store.ScoreStore(tmp_path / "z"), round_columns(16, other))
    with pytest.raises(AdaptiveError, match="confidence"):
        AdaptiveConfig(confidence=1.0)
    with pytest.raises(AdaptiveError, match="interval=normal"):
        AdaptiveConfig(compare="pairwise")
    with pytest.raises(AdaptiveError, match="unknown adaptive config"):
        AdaptiveConfig.from_mapping({"confidance": 0.9})


def test_job_adaptive_mode_then_exact_completion(tiny_model_dir, tmp_path):
    """The scoring job with scoring.mode=adaptive, then exact on the same workdir."""
    from configs import score as score_config
    from nuggets_jax.scoring import job as job

    config = score_config.get_config()
    (tmp_path / "pool.json").write_text(json.dumps(synthetic.generate_pool(20, seed=5)))
    (tmp_path / "tasks.json").write_text(json.dumps(synthetic.generate_tasks(16, seed=6)))
    config.model.path = str(tiny_model_dir)
    config.data.pool, config.data.tasks = str(tmp_path / "pool.json"), str(tmp_path / "tasks.json")
    config.select.top_n = 3
    config.progress = config.report = False
    config.scoring.mode = "adaptive"
    config.adaptive.update(tasks_per_round=4, initial_tasks=4, confidence=0.5, union=False, interval="normal")
    workdir = tmp_path / "w"
    run = job.run_score(config, workdir, log=lambda m: None)
    assert run["mode"] == "adaptive" and run["pairs_exact"] == 20 * 16
    assert 0 < run["pairs_scored"] < run["pairs_exact"] and run["compute_fraction"] == run["pairs_scored"] / 320
    rows = [json.loads(line) for line in (workdir / "adaptive.jsonl").read_text().splitlines()]
    golden = json.loads((workdir / "golden.json").read_text())
    assert sorted(g["id"] for g in golden) == sorted(r["id"] for r in rows if r["status"] == "in") and len(golden) == 3
    with np.load(workdir / "scores.npz") as z:
        assert np.isnan(z["one_logp"]).sum() == run["pairs_exact"] - run["pairs_scored"]
    config.scoring.mode = "exact"
    run = job.run_score(config, workdir, log=lambda m: None)
    assert run["one_shot"]["pairs"] == 320 - int(np.sum([r["tasks_scored"] for r in rows]))  # only what was missing
    with np.load(workdir / "scores.npz") as z:
        assert np.isfinite(z["one_logp"]).all()


def test_config_arguments_select_the_adaptive_mode():
    from configs import score as score_config
    from nuggets_jax.scoring import job as job

    assert score_config.get_config().scoring.mode == "exact"
    for name in ("safe", "fast"):
        config = score_config.get_config(f"adaptive={name}")
        assert config.scoring.mode == "adaptive"
        config.metric = "mean_logp_gain"
        job.validate(config)  # a consistent configuration
    fast = score_config.get_config("adaptive=fast").adaptive
    assert (fast.interval, fast.union, fast.compare) == ("normal", False, "pairwise")
    with pytest.raises(ValueError, match="adaptive=safe or adaptive=fast"):
        score_config.get_config("adaptive=quick")


def test_pairwise_in_rule_ignores_candidates_already_out():
    from nuggets_jax.scoring.adaptive.rule import _pairwise_status

    rng = np.random.default_rng(0)
    t = 100
    values = np.stack([1.0 + 0.01 * rng.standard_normal(t), 0.01 * rng.standard_normal(t), np.zeros(t)])
    values[2, :4] = [10.0, -10.0, 10.0, -10.0]  # out after 4 tasks; on those its difference to 0 is wide
    seen = np.array([40, 40, 4])
    status = np.array([ACTIVE, ACTIVE, OUT], np.int8)
    new = _pairwise_status(values, np.arange(t), seen, status, n=1, alpha=0.1, t=t)
    # Candidate 2 "could be above" candidate 0 on its 4 tasks, but being out it has a better one above
    # it, so it cannot be above the top-1: candidate 0 is in, candidate 1 (surely below 0) is out.
    np.testing.assert_array_equal(new, [IN, OUT, OUT])
