"""report.md of a synthetic scoring workdir: sections, plots, AUROC and Spearman values, escaping, robustness."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from nuggets_jax.metrics import METRICS, compute_all
from nuggets_jax.scoring.report import ReportError, write_report
from nuggets_jax.select import select, write_golden, write_ranking

NUM_CANDIDATES, NUM_TASKS, GOLDEN_SIZE = 40, 12, 8
KINDS = ("wrong_answer", "truncated", "noise")
HEADINGS = (
    "# Nuggets scoring report",
    "## Metrics",
    "## Plots",
    "## Corruption",
    "## Best and worst candidates",
    "## Per-task view",
    "## Run details",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(corruption: bool) -> list[dict]:
    records = []
    for index in range(NUM_CANDIDATES):
        record = {
            "id": f"ex{index}",
            "instruction": f"Question {index}: what is {index} | {index}?\nAnswer *briefly*.",
            "input": "",
            # Long, multi-line and full of markdown: the report must keep each table row intact.
            "output": f"Line one of {index} | pipe\nline two with `code` and <b>html</b> " + "x" * 200,
            "category": "arithmetic",
        }
        if corruption:
            record["corruption"] = KINDS[(index // 3) % 3] if index % 3 == 0 else None
        records.append(record)
    return records


def _make_workdir(path, corruption=True, run_json=True):
    rng = np.random.default_rng(0)
    records = _records(corruption)
    corrupted = np.array([record.get("corruption") is not None for record in records])
    n_tokens = rng.integers(8, 40, NUM_TASKS).astype(np.int32)  # [T]
    zero_logp = -(rng.uniform(1.0, 3.0, NUM_TASKS) * n_tokens).astype(np.float32)  # [T]
    # Corrupted demonstrations hurt: their one-shot log-probs are lower.
    shift = rng.normal(0.3, 2.0, (NUM_CANDIDATES, NUM_TASKS)) - 3.0 * corrupted[:, None]
    one_logp = (zero_logp + shift).astype(np.float32)  # [C, T]
    zero_correct = (n_tokens // 2).astype(np.int32)
    one_correct = np.clip(zero_correct + rng.integers(-2, 3, (NUM_CANDIDATES, NUM_TASKS)), 0, n_tokens)
    scores = {
        "zero_logp": zero_logp,
        "zero_correct": zero_correct,
        "n_tokens": n_tokens,
        "one_logp": one_logp,
        "one_correct": one_correct.astype(np.int32),
        "candidate_ids": np.array([r["id"] for r in records]),
        "task_ids": np.array([f"task{t}" for t in range(NUM_TASKS)]),
    }
    np.savez(path / "scores.npz", **scores)
    metrics = compute_all(scores)
    write_ranking(path / "ranking.jsonl", records, metrics, "win_rate")
    write_golden(path / "golden.json", records, select(metrics["win_rate"], top_n=GOLDEN_SIZE), metrics, "win_rate")
    config = {
        "model": {"path": "default", "dtype": "float32"},
        "data": {"pool": "pool.json", "tasks": "tasks.json"},
        "preset": "original",
        "metric": "win_rate",
        "select": {"top_n": GOLDEN_SIZE, "top_fraction": None, "threshold": None},
    }
    (path / "config.json").write_text(json.dumps(config))
    if run_json:
        run = {
            "devices": {"count": 8, "platform": "cpu", "kind": "cpu", "processes": 1},
            "model": {"path": "default", "dtype": "float32", "parameters": 134_515_008},
            "counts": {"candidates": NUM_CANDIDATES, "tasks": NUM_TASKS, "pairs": NUM_CANDIDATES * NUM_TASKS},
            "timings": {"load_s": 1.5, "compile_s": 3.0, "one_shot_s": 20.0},  # some keys missing on purpose
            "tokens_per_s": 812.5,
            "pairs_per_s": 24.0,
            "flops_per_s": 1.9e11,
            "wall_s": 30.0,
            "programs_compiled": 4,
            "compiles_after_warmup": 0,
            "buckets": {"prefix": [64, 128], "row_length": 256, "fill": 0.91},
            "cuts": {"candidates_cut": 2, "tasks_cut": 0},
        }
        (path / "run.json").write_text(json.dumps(run))
    return records, scores, metrics, corrupted


def _table_after(text: str, marker: str) -> list[list[str]]:
    """Cells of the first markdown table after `marker`, header row first, split on unescaped pipes."""
    lines = text[text.rfind("\n", 0, text.index(marker)) + 1 :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def _pairwise_auroc(values: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = values[positive], values[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def test_report_has_every_section_in_order_and_valid_plots(tmp_path):
    records, _, _, _ = _make_workdir(tmp_path)
    path = write_report(tmp_path, records)
    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")
    positions = [text.index(heading) for heading in HEADINGS]
    assert positions == sorted(positions)
    images = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", text)
    expected = {f"plots/hist_{name}.png" for name in METRICS}
    expected |= {"plots/metric_correlation.png", "plots/metric_scatter.png", "plots/corruption.png"}
    expected |= {"plots/task_win_fraction.png"}
    assert set(images) == expected
    for image in images:
        data = (tmp_path / image).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, image
    assert f"{NUM_CANDIDATES} candidates x {NUM_TASKS} tasks" in text
    assert "**8** records (top_n = 8)" in text
    assert "190.0 GFLOP/s" in text and "134.5M parameters" in text


@pytest.mark.parametrize(
    ("select", "selection", "wording"),
    [
        # The default run: config.json's select is unset, run.json says what the job used.
        ({"top_n": None, "top_fraction": None, "threshold": None}, {"top_fraction": 0.1}, "top_fraction = 0.1"),
        ({"top_n": None, "top_fraction": None, "threshold": None}, None, "top_fraction = 0.1"),
        ({"top_n": None, "top_fraction": None, "threshold": 0.5}, {"threshold": 0.5}, "threshold = 0.5"),
        ({"top_n": 8, "top_fraction": None, "threshold": None}, None, "top_n = 8"),
    ],
)
def test_report_names_the_rule_that_picked_the_golden_set(tmp_path, select, selection, wording):
    _make_workdir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "select": select}))
    run = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps(run if selection is None else {**run, "selection": selection}))
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert f"**{GOLDEN_SIZE}** records ({wording})" in text
    assert "rule n/a" not in text


def test_report_is_deterministic(tmp_path):
    records, _, _, _ = _make_workdir(tmp_path)
    first = write_report(tmp_path, records).read_text(encoding="utf-8")
    first_plots = {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()}
    second = write_report(tmp_path, records).read_text(encoding="utf-8")
    assert first == second
    assert first_plots == {p.name: p.read_bytes() for p in (tmp_path / "plots").iterdir()}


def test_auroc_table_matches_pairwise_count(tmp_path):
    records, _, _, _ = _make_workdir(tmp_path)
    text = write_report(tmp_path, records).read_text(encoding="utf-8")
    lines = [json.loads(line) for line in (tmp_path / "ranking.jsonl").read_text().splitlines()]
    kinds = np.array([line["corruption"] or "clean" for line in lines])
    rows = _table_after(text, "## Corruption")
    header, body = rows[0], {row[0]: row[1:] for row in rows[1:]}
    assert header[1] == "clean vs all corrupted"
    assert header[2:] == [f"clean vs {kind}" for kind in sorted(KINDS)]
    assert set(body) == set(METRICS)
    clean = kinds == "clean"
    for name in METRICS:
        values = np.array([line[name] for line in lines])
        expected = [_pairwise_auroc(values, clean)]
        for kind in sorted(KINDS):
            keep = clean | (kinds == kind)
            expected.append(_pairwise_auroc(values[keep], clean[keep]))
        assert [float(cell) for cell in body[name]] == pytest.approx(expected, abs=5e-4 + 1e-9), name
    # The synthetic corrupted candidates are worse, so the ranking metric must find them.
    assert float(body["win_rate"][0]) > 0.8

    golden = {item["id"] for item in json.loads((tmp_path / "golden.json").read_text())}
    kind_rows = {row[0]: row for row in _table_after(text, "share of golden set")[1:]}
    for kind in ("clean", *KINDS):
        ids = [line["id"] for line in lines if (line["corruption"] or "clean") == kind]
        assert kind_rows[kind][1] == str(len(ids))
        assert kind_rows[kind][3] == f"{sum(i in golden for i in ids) / len(golden):.1%}"
        mean_rank = np.mean([line["rank"] for line in lines if (line["corruption"] or "clean") == kind])
        assert kind_rows[kind][4] == f"{mean_rank:.1f}"


def test_spearman_table_matches_scipy(tmp_path):
    records, _, metrics, _ = _make_workdir(tmp_path)
    text = write_report(tmp_path, records).read_text(encoding="utf-8")
    rows = _table_after(text, "Spearman rank correlation between metrics:")
    names = rows[0][1:]
    assert names == list(METRICS)
    for row in rows[1:]:
        for other, cell in zip(names, row[1:], strict=True):
            rho = scipy.stats.spearmanr(metrics[row[0]], metrics[other]).statistic
            assert float(cell) == pytest.approx(rho, abs=5e-4 + 1e-9)


def test_examples_escape_markdown_and_keep_rows_intact(tmp_path):
    records, _, _, _ = _make_workdir(tmp_path)
    text = write_report(tmp_path, records).read_text(encoding="utf-8")
    section = text[text.index("## Best and worst candidates") : text.index("## Per-task view")]
    best = _table_after(section, "Best 5")
    assert best[0] == ["rank", "id", *METRICS, "instruction", "output"]
    assert all(len(row) == len(best[0]) for row in best)
    assert [row[0] for row in best[1:]] == ["1", "2", "3", "4", "5"]
    first_line = json.loads((tmp_path / "ranking.jsonl").read_text().splitlines()[0])
    assert best[1][1] == first_line["id"]
    index = int(first_line["id"].removeprefix("ex"))
    assert best[1][-2] == rf"Question {index}: what is {index} \| {index}? ⏎ Answer \*briefly\*."
    assert best[1][-1].startswith(rf"Line one of {index} \| pipe ⏎ line two with \`code\` and \<b\>html\</b\> x")
    assert best[1][-1].endswith("…") and len(best[1][-1].replace("\\", "")) == 120
    worst = _table_after(section, "Worst 5")
    assert [row[0] for row in worst[1:]] == [str(NUM_CANDIDATES - i) for i in range(5)]
    assert "\n" not in best[1][-1] and "<b>" not in section


def test_records_none_shows_ids_only(tmp_path):
    _make_workdir(tmp_path)
    text = write_report(tmp_path).read_text(encoding="utf-8")
    best = _table_after(text, "Best 5")
    assert best[0] == ["rank", "id", *METRICS]


def test_workdir_without_run_json_or_corruption(tmp_path):
    records, _, _, _ = _make_workdir(tmp_path, corruption=False, run_json=False)
    text = write_report(tmp_path, records).read_text(encoding="utf-8")
    for heading in HEADINGS:
        assert (heading in text) == (heading != "## Corruption")
    assert "run.json not found" in text and "Wall time n/a s on n/a" in text
    assert not (tmp_path / "plots" / "corruption.png").exists()
    assert (tmp_path / "plots" / "task_win_fraction.png").read_bytes().startswith(PNG_MAGIC)


def test_unscored_candidates_and_malformed_optional_files(tmp_path):
    records, _, _, _ = _make_workdir(tmp_path)
    ranking = tmp_path / "ranking.jsonl"
    lines = [json.loads(line) for line in ranking.read_text().splitlines()]
    for line in lines[-3:]:
        line["win_rate"] = None  # not scored yet (adaptive mode writes null)
    ranking.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "run.json").write_text(json.dumps({"devices": "cpu", "timings": None, "wall_s": "fast"}))
    np.savez(tmp_path / "scores.npz", zero_logp=np.zeros(3), n_tokens=np.ones(4), one_logp=np.zeros((40, 3)))
    text = write_report(tmp_path, records).read_text(encoding="utf-8")
    scored = np.array([line["win_rate"] for line in lines[:-3]])
    stats = {row[0]: row for row in _table_after(text, "## Metrics")[1:]}
    assert stats["**win_rate**"][-1] == "3" and stats["mean_logp_gain"][-1] == "0"
    assert float(stats["**win_rate**"][1]) == pytest.approx(scored.mean(), rel=1e-3)
    clean = np.array([line["corruption"] is None for line in lines[:-3]])
    auroc_row = {row[0]: row for row in _table_after(text, "## Corruption")[1:]}["win_rate"]
    assert float(auroc_row[1]) == pytest.approx(_pairwise_auroc(scored, clean), abs=5e-4 + 1e-9)
    worst = _table_after(text, "Worst 5")
    assert [row[2] for row in worst[1:4]] == ["n/a"] * 3
    assert "scores.npz shapes do not match" in text
    assert "Wall time n/a s on n/a" in text


def test_metric_override_reorders_examples(tmp_path):
    records, _, metrics, _ = _make_workdir(tmp_path)
    text = write_report(tmp_path, records, metric="token_acc_gain").read_text(encoding="utf-8")
    best = _table_after(text, "Best 5")
    column = best[0].index("token_acc_gain")
    shown = [float(row[column]) for row in best[1:]]
    assert shown == sorted(shown, reverse=True)
    assert shown[0] == pytest.approx(metrics["token_acc_gain"].max(), abs=1e-3)


def test_per_task_fractions_match_independent_count(tmp_path):
    records, scores, _, _ = _make_workdir(tmp_path)
    text = write_report(tmp_path, records).read_text(encoding="utf-8")
    wins = (scores["one_logp"] > scores["zero_logp"][None, :]).mean(axis=0)  # [T]
    easiest = _table_after(text, "Tasks where demonstrations help most often")
    hardest = _table_after(text, "Tasks where demonstrations help least often")
    for rows in (easiest, hardest):
        for row in rows[1:]:
            task = int(row[0].removeprefix("task"))
            assert float(row[3]) == pytest.approx(wins[task], abs=5e-4 + 1e-9)
            per_token = scores["zero_logp"][task] / scores["n_tokens"][task]
            assert float(row[2]) == pytest.approx(per_token, abs=5e-4)
    assert float(easiest[1][3]) == pytest.approx(wins.max(), abs=5e-4 + 1e-9)
    assert float(hardest[1][3]) == pytest.approx(wins.min(), abs=5e-4 + 1e-9)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ReportError, match="ranking.jsonl not found"):
        write_report(tmp_path)
    _make_workdir(tmp_path)
    with pytest.raises(ReportError, match="'no_such_metric' is not in ranking.jsonl"):
        write_report(tmp_path, metric="no_such_metric")
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"run\.json:1: not valid JSON"):
        write_report(tmp_path)


def test_report_module_imports_neither_jax_nor_pyplot():
    code = (
        "import sys, nuggets_jax.scoring.report; "
        "bad = [m for m in ('jax', 'flax', 'matplotlib.pyplot') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
