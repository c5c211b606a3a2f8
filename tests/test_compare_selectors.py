"""The selector comparison end to end (runlocal on a tiny model), its selections and its summary."""

import json
import subprocess
import sys

import numpy as np
import pytest

from nuggets_jax import select as select_lib
from nuggets_jax.finetune import selectors
from tests.conftest import REPO


def test_selections_take_each_selectors_best_and_random_per_seed():
    rng = np.random.default_rng(0)
    values = {name: rng.normal(size=30) for name in ("win_rate", "mean_logp_gain", "ifd", "length")}
    values["ifd"][:5] = np.nan  # at or above ifd_max: never chosen
    embeddings = rng.normal(size=(30, 8))
    diversity = select_lib.Diversity(0.5, "k_center", 2.0)
    shortlisted = []

    def embed(indices):
        shortlisted.append(indices)
        return embeddings[indices]

    chosen = selectors.choose_selections(
        values, 6, ("win_rate", "ifd", "diverse", "random"), (0, 1), diversity, "win_rate", embed
    )
    by_name = {v.name: v for v in chosen}
    assert list(by_name) == ["win_rate", "ifd", "diverse", "random_s0", "random_s1"]
    np.testing.assert_array_equal(by_name["win_rate"].indices, np.argsort(-values["win_rate"])[:6])
    assert not set(by_name["ifd"].indices) & set(range(5))
    assert set(by_name["diverse"].indices) <= set(np.argsort(-values["win_rate"])[:12])
    np.testing.assert_array_equal(shortlisted[0], np.argsort(-values["win_rate"])[:12])
    assert len(set(by_name["random_s0"].indices)) == 6
    assert not np.array_equal(by_name["random_s0"].indices, by_name["random_s1"].indices)
    with pytest.raises(selectors.SelectorComparisonError, match="only 25 scored records"):
        selectors.choose_selections(values, 26, ("ifd",), (), diversity, "win_rate", embed)
    # Records too long to train on are picked by no selector.
    eligible = np.ones(30, bool)
    eligible[np.argsort(-values["win_rate"])[:3]] = False  # the three best by win rate
    eligible[[20, 21]] = False
    names = ("win_rate", "diverse", "random")
    kept = selectors.choose_selections(values, 6, names, (0, 1, 2), diversity, "win_rate", embed, eligible)
    for variant in kept:
        assert eligible[variant.indices].all() and len(set(variant.indices)) == 6
    best = np.argsort(-np.where(eligible, values["win_rate"], -np.inf))[:6]
    np.testing.assert_array_equal(kept[0].indices, best)
    # A draw that holds no ineligible record is kept: the picks of a pool with none (saved comparisons resume).
    draws = [np.sort(np.random.default_rng(s).choice(30, size=6, replace=False)) for s in (0, 1, 2)]
    np.testing.assert_array_equal(by_name["random_s0"].indices, draws[0])
    for seed, variant in zip((0, 1, 2), kept[2:], strict=True):
        if eligible[draws[seed]].all():
            np.testing.assert_array_equal(variant.indices, draws[seed])
    allowed = int(eligible.sum())
    with pytest.raises(selectors.SelectorComparisonError, match=f"has {allowed} records to pick from"):
        selectors.choose_selections(values, allowed + 1, ("random",), (0,), diversity, "win_rate", embed, eligible)


def test_summary_averages_a_selectors_runs_with_their_spread():
    def row(kind, delta):
        return {"kind": kind, "records": 4, "eval": {"a": {"nll_per_token": 1 + delta, "delta_nll_per_token": delta,
                                                          "win_rate_vs_base": 0.5 - delta}}}  # fmt: skip

    lines = selectors.summarize([row("win_rate", -0.1), row("random", 0.0), row("random", 0.2)], ["a"])
    assert [line["selector"] for line in lines] == ["win_rate", "random"]
    assert lines[0]["a/delta_nll_per_token"] == pytest.approx(-0.1) and lines[0]["a/delta_nll_per_token_std"] is None
    assert lines[1]["a/delta_nll_per_token"] == pytest.approx(0.1)
    assert lines[1]["a/delta_nll_per_token_std"] == pytest.approx(np.std([0.0, 0.2], ddof=1))


def test_split_holds_out_a_seeded_disjoint_part():
    objects = [{"instruction": str(i), "output": "x", "id": i} for i in range(20)]
    keep, held = selectors.split_pool(objects, 5, seed=3)
    assert len(held) == 5 and len(keep) == 15
    assert {o["id"] for o in keep}.isdisjoint(o["id"] for o in held)
    assert selectors.split_pool(objects, 5, seed=3) == (keep, held)
    with pytest.raises(selectors.SelectorComparisonError, match="leaves no selection pool"):
        selectors.split_pool(objects, 20, seed=0)


def test_records_without_a_response_are_left_out_of_pool_and_eval_sets(tmp_path):
    from configs import compare_selectors as config_lib
    from nuggets_jax.finetune import compare

    objects = [{"instruction": f"Say {i}.", "output": "" if i in (1, 4) else str(i)} for i in range(8)]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(objects))
    config = config_lib.get_config(f"public,pool={path}")  # `public` keeps the pool it is given
    config.max_pool = 5
    kept, source, template = selectors._pool_objects(config)
    assert [o["id"] for o in kept] == [0, 2, 3, 5, 6]  # ids stay the file positions; max_pool counts kept ones
    assert source == f"{path} (2 record(s) with an empty response left out, first {path}[1])" and template == "text"
    config.max_pool = 2  # only the empty records before the last one taken are counted
    kept, source, _ = selectors._pool_objects(config)
    assert [o["id"] for o in kept] == [0, 2]
    assert source == f"{path} (1 record(s) with an empty response left out, first {path}[1])"
    config.eval.max_examples = 3
    records, source = compare.eval_records(config.eval, str(path), [])
    assert [r.output for r in records] == ["0", "2", "3"] and "2 example(s) with an empty reference" in source


@pytest.mark.slow
def test_runlocal_comparison_runs_end_to_end_and_its_table_has_every_selector(tmp_path, tiny_model_dir):
    workdir = tmp_path / "selectors"
    cmd = [
        sys.executable, "-m", "experiments.compare_selectors", "--config=configs/compare_selectors.py:runlocal",
        f"--config.model.path={tiny_model_dir}", "--config.progress=False", f"--workdir={workdir}",
    ]  # fmt: skip
    env = {"JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    kinds = [line["selector"] for line in results["summary"]]
    assert kinds == ["win_rate", "mean_logp_gain", "diverse", "ifd", "perplexity", "length", "random"]
    assert results["eval_sets"] == ["heldout", "generated"]
    random_line = results["summary"][-1]
    assert random_line["runs"] == 2 and random_line["heldout/delta_nll_per_token_std"] is not None
    selections = json.loads((workdir / "selections.json").read_text())
    assert all(len(ids) == 4 for ids in selections.values())
    heldout_ids = {str(o["id"]) for o in json.loads((workdir / "data" / "heldout.json").read_text())}
    assert len(heldout_ids) == 8 and not heldout_ids & {str(i) for ids in selections.values() for i in ids}
    report = (workdir / "report.md").read_text()
    for kind in kinds:
        assert f"| {kind} |" in report
    assert results["template"] == "text" and "the paper's text template" in report
    assert (workdir / "plots" / "selectors.png").is_file()
    # A rerun trains nothing again and gives the same table.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((workdir / "results.json").read_text())["summary"] == results["summary"]
    assert again.stderr.count("already finished") == len(selections) == 8
    # Every evaluation is saved, so no evaluator compiles (the scoring run still builds its engines).
    compiled = proc.stderr.count("programs compiled") - again.stderr.count("programs compiled")
    assert compiled == len(results["eval_sets"]), again.stderr


@pytest.mark.slow
def test_a_conversation_pool_runs_under_the_chat_template(tmp_path, tiny_model_dir):
    import shutil

    from nuggets_jax import synthetic
    from tests.test_chat import TINY_TEMPLATE

    model = tmp_path / "chat_model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": TINY_TEMPLATE}))
    pool = [
        {"id": f"c{i}", "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": r["instruction"] + " " + r["input"]},
                                     {"role": "assistant", "content": r["output"]}]}
        for i, r in enumerate(synthetic.generate_pool(40, seed=5))
    ]  # fmt: skip
    path = tmp_path / "chat_pool.json"
    path.write_text(json.dumps(pool))
    base = [
        sys.executable, "-m", "experiments.compare_selectors",
        f"--config=configs/compare_selectors.py:runlocal,pool={path}",
        f"--config.model.path={model}", "--config.progress=False", "--config.eval.sets=('heldout',)",
        "--config.selectors=('win_rate','length','random')", f"--workdir={tmp_path / 'w'}",
    ]  # fmt: skip
    env = {"JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    text = [*base, "--config.template=text"]
    refused = subprocess.run(text, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "record 'c0' is a conversation" in refused.stderr and "--config.template=chat" in refused.stderr
    proc = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)  # auto: chat
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert [line["selector"] for line in results["summary"]] == ["win_rate", "length", "random"]
    scoring = json.loads((tmp_path / "w" / "scoring" / "config.json").read_text())
    assert scoring["data"]["template"] == "chat"
    assert results["template"] == "chat" and "the model's chat template" in (tmp_path / "w" / "report.md").read_text()
