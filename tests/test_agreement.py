"""Agreement with outside labels: label readers, AUROC / Spearman / pair shares per scorer, APE pairs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from nuggets_jax import data, metrics
from nuggets_jax.scoring import agreement
from tests.conftest import REPO

POOL = [
    {"instruction": "Add 2 and 3.", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "red"},
    {"instruction": "Convert 4 km.", "input": "to metres", "output": "4000 m"},
    {"instruction": "Say hi.", "output": "hi"},
    {"instruction": "Sort: b a", "output": "a b"},
]


def _records(objects):
    return data.records_from_objects([(f"pool[{i}]", o) for i, o in enumerate(objects)], "pool")


def _write(path, objects):
    path.write_text(json.dumps(objects))
    return str(path)


def test_member_and_score_labels_join_on_instruction_and_input(tmp_path):
    records = _records(POOL)
    members = _write(
        tmp_path / "members.json",
        [{"instruction": " Add 2 and 3. ", "output": "other"}, POOL[2], {"instruction": "x", "output": "y"}],
    )
    target = np.asarray([0.2, 0.7, 0.4, 0.9, 0.5])  # in pool order, written shuffled
    scores = _write(tmp_path / "scores.json", [{**POOL[i], "score": target[i]} for i in (3, 0, 4, 1, 2)])
    values = {"win_rate": np.asarray([0.9, 0.1, 0.8, 0.3, 0.4]), "length": np.asarray([1.0, 2.0, np.nan, 4.0, 5.0])}
    rows = agreement.agreement_rows(
        records, values,
        [agreement.LabelSource("m", "member", members), agreement.LabelSource("s", "score", scores)],
    )  # fmt: skip
    cell = {(r["label"], r["scorer"]): r for r in rows}
    positive = np.asarray([True, False, True, False, False])
    assert cell["m", "win_rate"]["value"] == metrics.auroc(values["win_rate"], positive) == 1.0
    assert cell["m", "win_rate"]["positives"] == 2 and cell["m", "length"]["n"] == 4  # NaN left out
    assert cell["m", "length"]["value"] == metrics.auroc(values["length"][[0, 1, 3, 4]], positive[[0, 1, 3, 4]])
    assert cell["s", "win_rate"]["n"] == 5
    assert cell["s", "win_rate"]["value"] == pytest.approx(metrics.spearman(values["win_rate"], target))
    # length joins 4 records (one NaN): below agreement.MIN_RANKED, so no Spearman is reported.
    assert cell["s", "length"]["n"] == 4 and np.isnan(cell["s", "length"]["value"])


def test_pairs_count_revised_wins_and_clean_uses_the_pool_field():
    objects = [
        {**POOL[i % 5], "output": f"r{i}", "pair": i // 2, "revised": i % 2, "corruption": None if i % 3 else "x"}
        for i in range(6)
    ]
    records = _records(objects)
    # pair 0: revised 0.5 > 0.1 wins; pair 1: revised 0.2 < 0.3 loses; pair 2: a tie counts 1/2.
    values = {"win_rate": np.asarray([0.1, 0.5, 0.3, 0.2, 0.7, 0.7])}
    rows = agreement.agreement_rows(
        records, values, [agreement.LabelSource("p", "pairs"), agreement.LabelSource("c", "clean", field="corruption")]
    )
    assert rows[0]["value"] == pytest.approx(0.5) and rows[0]["n"] == 3
    clean = np.asarray([o["corruption"] is None for o in objects])
    assert rows[1]["value"] == metrics.auroc(values["win_rate"], clean)
    with pytest.raises(agreement.AgreementError, match='"pair" and "revised"'):
        agreement.agreement_rows(_records(POOL), {"x": np.zeros(5)}, [agreement.LabelSource("p", "pairs")])


def test_bad_label_files_name_the_record_and_the_fix(tmp_path):
    bad = _write(tmp_path / "bad.json", [{**POOL[0], "score": "high"}])
    with pytest.raises(agreement.AgreementError, match=r"bad.json.*\[0\].*not a number"):
        agreement.read_labels(agreement.LabelSource("s", "score", bad))
    with pytest.raises(agreement.AgreementError, match="unknown kind"):
        agreement.LabelSource("s", "sorted", bad).check()
    with pytest.raises(agreement.AgreementError, match="needs a path"):
        agreement.LabelSource("s", "member").check()


def test_ape_pairs_are_unescaped_on_both_sides(tmp_path):
    path = tmp_path / "ape.csv"
    path.write_text(
        "src,score\n"
        '"Instruction: Describe rain. Response: Rain falls.\\nIt is wet.",0\n'
        '"Instruction: Describe rain. Response: Rain falls.\nIt is wet and cold.",1\n'
        '"Instruction: Translate. Input: hola Response: hello",0\n'
        '"Instruction: Translate. Input: hola Response: Hello!",1\n'
    )
    objects = agreement.ape_objects(path)
    assert [o["pair"] for o in objects] == [0, 0, 1, 1] and [o["revised"] for o in objects] == [0, 1, 0, 1]
    assert objects[0]["output"] == "Rain falls.\nIt is wet." and "\\n" not in objects[0]["output"]
    assert objects[2]["instruction"] == "Translate." and objects[2]["input"] == "hola"


def test_public_label_files_parse(shared_data):
    pairs = agreement.ape_objects(shared_data / "car" / "APE_score_test.csv")
    assert len(pairs) >= 500 and sum(o["revised"] for o in pairs) >= 250
    path = shared_data / "longismore" / "filtered_alpaca_1k_longest.json"
    longest = agreement.LabelSource("l", "score", str(path), "score", "longismore")
    assert len(agreement.read_labels(longest)) >= 990
    gold = agreement.read_labels(
        agreement.LabelSource("g", "score", str(shared_data / "nuggets" / "alpaca_gpt4_bad.json"))
    )
    assert max(gold.values()) <= 0.5


@pytest.mark.slow
def test_runlocal_agreement_end_to_end(tmp_path, tiny_model_dir):
    cmd = [
        sys.executable, "-m", "experiments.agreement", "--config=configs/agreement.py:runlocal",
        f"--config.score.model.path={tiny_model_dir}", "--config.score.progress=False", f"--workdir={tmp_path}",
    ]  # fmt: skip
    env = {"JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "agreement.json").read_text())
    scorers = {r["scorer"] for r in result["rows"]}
    assert scorers == set(metrics.METRICS) | set(metrics.BASELINES)
    assert all(0.0 <= r["value"] <= 1.0 for r in result["rows"] if np.isfinite(r["value"]))
    assert result["pool_size"] == 24 and "| clean |" in (tmp_path / "agreement.md").read_text()
