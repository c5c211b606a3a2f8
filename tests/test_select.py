"""Ranking order and ties, selection criteria and their errors, ranking.jsonl and golden.json."""

import json

import numpy as np
import pytest

from nuggets_jax import select as select_lib
from nuggets_jax.select import (
    SelectionError,
    rank_order,
    ranks,
    read_golden,
    select,
    write_golden,
    write_ranking,
)

NAN = float("nan")


def test_rank_order_breaks_ties_by_position_and_puts_nan_last():
    values = [1.0, 3.0, 3.0, NAN, 2.0, 3.0, NAN, -np.inf]
    # By hand: the three 3.0s in position order, then 2.0, 1.0, -inf, then the NaNs in position order.
    expected = [1, 2, 5, 4, 0, 7, 3, 6]
    np.testing.assert_array_equal(rank_order(values), expected)
    expected_ranks = np.empty(8, dtype=int)
    expected_ranks[expected] = np.arange(1, 9)
    np.testing.assert_array_equal(ranks(values), expected_ranks)
    assert ranks(values)[1] == 1 and ranks(values)[6] == 8


def test_rank_order_all_equal_is_position_order():
    np.testing.assert_array_equal(rank_order(np.zeros(5)), np.arange(5))
    np.testing.assert_array_equal(rank_order([-0.0, 0.0, -0.0]), [0, 1, 2])


def test_rank_order_rejects_non_vectors():
    with pytest.raises(SelectionError, match=r"one score per candidate"):
        rank_order(np.zeros((2, 2)))


VALUES = np.array([0.2, 0.9, 0.5, 0.9, 0.1, 0.7, 0.3, 0.6, 0.4, 0.8])


def test_select_top_n():
    np.testing.assert_array_equal(select(VALUES, top_n=3), [1, 3, 9])
    np.testing.assert_array_equal(select(VALUES, top_n=1), [1])
    np.testing.assert_array_equal(select(VALUES, top_n=np.int64(2)), [1, 3])


def test_select_top_n_larger_than_pool_keeps_all_in_rank_order():
    np.testing.assert_array_equal(select(VALUES, top_n=50), [1, 3, 9, 5, 7, 2, 8, 6, 0, 4])


def test_select_top_fraction_rounds_up():
    # ceil(0.25 * 10) = 3; ceil(0.1 * 10) = 1; 1.0 keeps everything.
    np.testing.assert_array_equal(select(VALUES, top_fraction=0.25), [1, 3, 9])
    np.testing.assert_array_equal(select(VALUES, top_fraction=0.1), [1])
    assert select(VALUES, top_fraction=1.0).size == 10
    # 0.1 * 30 is 3.0000000000000004 in binary floating point; the intended count is 3.
    assert select(np.arange(30.0), top_fraction=0.1).size == 3
    assert select(np.arange(30.0), top_fraction=0.11).size == 4


def test_select_threshold_is_inclusive():
    np.testing.assert_array_equal(select(VALUES, threshold=0.7), [1, 3, 9, 5])
    np.testing.assert_array_equal(select(VALUES, threshold=0.95), [])
    np.testing.assert_array_equal(select(VALUES, threshold=-1.0), rank_order(VALUES))


def test_select_never_picks_unscored_candidates():
    values = [0.5, NAN, 0.9, NAN]
    np.testing.assert_array_equal(select(values, top_n=4), [2, 0])
    np.testing.assert_array_equal(select(values, top_fraction=1.0), [2, 0])
    np.testing.assert_array_equal(select(values, threshold=0.0), [2, 0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "set exactly one .*none was set"),
        ({"top_n": 3, "threshold": 0.5}, "set exactly one .*got threshold, top_n"),
        ({"top_n": 1, "top_fraction": 0.5, "threshold": 0.1}, "set exactly one"),
        ({"top_n": 0}, "top_n must be a positive integer"),
        ({"top_n": 2.5}, "top_n must be a positive integer"),
        ({"top_n": True}, "top_n must be a positive integer"),
        ({"top_fraction": 0.0}, r"top_fraction must be in \(0, 1\]"),
        ({"top_fraction": 1.5}, r"top_fraction must be in \(0, 1\]"),
        ({"threshold": NAN}, "threshold must be a number"),
    ],
)
def test_select_errors(kwargs, message):
    with pytest.raises(SelectionError, match=message):
        select(VALUES, **kwargs)


def _records():
    return [
        {"id": "a", "instruction": "Say hi.", "input": "", "output": "Hi.", "source": "x", "tags": [1, 2]},
        {"id": "b", "instruction": "Größe?", "input": "Zürich", "output": "Groß.", "source": "y"},
        {"id": 7, "instruction": "Count.", "output": "1 2 3", "corruption": None},
        {"id": "d", "instruction": "Add.", "input": "1 and 2", "output": "3", "category": "arithmetic"},
    ]


def _metrics():
    return {
        "win_rate": np.array([0.25, 0.75, 0.75, 0.5]),
        "mean_logp_gain": np.array([0.1 + 0.2, -1 / 3, NAN, np.inf]),
    }


def test_write_ranking_lines_in_rank_order(tmp_path):
    path = write_ranking(tmp_path / "ranking.jsonl", _records(), _metrics(), "win_rate")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    # win_rate 0.75 (b), 0.75 (id 7, later position), 0.5 (d), 0.25 (a).
    assert [line["id"] for line in lines] == ["b", 7, "d", "a"]
    assert [line["rank"] for line in lines] == [1, 2, 3, 4]
    assert lines[0] == {"rank": 1, "id": "b", "win_rate": 0.75, "mean_logp_gain": -1 / 3, "source": "y"}
    assert lines[1] == {"rank": 2, "id": 7, "win_rate": 0.75, "mean_logp_gain": None, "corruption": None}
    assert lines[2]["mean_logp_gain"] is None  # infinity is not JSON either
    assert lines[2]["category"] == "arithmetic"
    # Full precision: 0.1 + 0.2 is 0.30000000000000004 and comes back bit for bit.
    assert lines[3]["mean_logp_gain"] == 0.1 + 0.2
    assert lines[3]["tags"] == [1, 2]
    assert list(lines[0]) == ["rank", "id", "win_rate", "mean_logp_gain", "source"]
    assert "Größe" not in path.read_text(encoding="utf-8")  # instruction is not an extra field


def test_write_ranking_by_another_metric(tmp_path):
    path = write_ranking(tmp_path / "r.jsonl", _records(), _metrics(), "mean_logp_gain")
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert ids == ["d", "a", "b", 7]  # inf, 0.3, -1/3, then NaN last


def test_write_ranking_record_without_id_uses_position(tmp_path):
    records = [{"instruction": "x", "output": "y"}, {"instruction": "z", "output": "w"}]
    path = write_ranking(tmp_path / "r.jsonl", records, {"win_rate": np.array([0.0, 1.0])}, "win_rate")
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [1, 0]


def test_write_ranking_errors(tmp_path):
    with pytest.raises(SelectionError, match="rank metric 'token_acc_gain' is not among"):
        write_ranking(tmp_path / "r.jsonl", _records(), _metrics(), "token_acc_gain")
    with pytest.raises(SelectionError, match="metric 'win_rate' has shape \\(3,\\) but there are 4"):
        write_ranking(tmp_path / "r.jsonl", _records(), {"win_rate": np.zeros(3)}, "win_rate")
    records = _records()
    records[2]["win_rate"] = 1.0
    with pytest.raises(SelectionError, match="record 2 \\(id 7\\): field 'win_rate' clashes"):
        write_ranking(tmp_path / "r.jsonl", records, _metrics(), "win_rate")
    assert not (tmp_path / "r.jsonl").exists()


def test_golden_round_trip(tmp_path):
    records = _records()
    metric_values = _metrics()
    selected = select(metric_values["win_rate"], top_n=3)
    path = write_golden(tmp_path / "out" / "golden.json", records, selected, metric_values, "win_rate")
    assert read_golden(path) == [records[1], records[2], records[3]]
    assert records == _records()  # inputs not mutated
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw[0]["nuggets"] == {"rank": 1, "win_rate": 0.75, "mean_logp_gain": -1 / 3}
    assert raw[1]["nuggets"] == {"rank": 2, "win_rate": 0.75, "mean_logp_gain": None}
    assert raw[2]["nuggets"]["rank"] == 3
    text = path.read_text(encoding="utf-8")
    assert "Größe" in text and text.startswith('[\n  {\n    "id": "b"')  # ensure_ascii=False, indent=2
    assert sorted(p.name for p in path.parent.iterdir()) == ["golden.json"]  # no temporary file left


def test_golden_is_written_in_rank_order_whatever_the_selection_order(tmp_path):
    path = write_golden(tmp_path / "g.json", _records(), [0, 3, 1], _metrics(), "win_rate")
    assert [r["id"] for r in read_golden(path)] == ["b", "d", "a"]
    assert [r["nuggets"]["rank"] for r in json.loads(path.read_text())] == [1, 3, 4]


def test_golden_overwrites_atomically(tmp_path):
    path = tmp_path / "g.json"
    write_golden(path, _records(), [0], _metrics(), "win_rate")
    write_golden(path, _records(), [3], _metrics(), "win_rate")
    assert [r["id"] for r in read_golden(path)] == ["d"]


def test_golden_errors(tmp_path):
    with pytest.raises(SelectionError, match="repeat a candidate"):
        write_golden(tmp_path / "g.json", _records(), [1, 1], _metrics(), "win_rate")
    with pytest.raises(SelectionError, match="must lie in \\[0, 4\\)"):
        write_golden(tmp_path / "g.json", _records(), [4], _metrics(), "win_rate")
    records = _records()
    records[3]["nuggets"] = {"rank": 1}
    with pytest.raises(SelectionError, match="record 3 \\(id 'd'\\) already has a 'nuggets' field"):
        write_golden(tmp_path / "g.json", records, [3], _metrics(), "win_rate")
    assert not (tmp_path / "g.json").exists()


def test_read_golden_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"id": 1}')
    with pytest.raises(SelectionError, match="bad.json: expected a JSON list"):
        read_golden(path)
    path.write_text("[1, 2]")
    with pytest.raises(SelectionError, match="bad.json: record 0 is int"):
        read_golden(path)
    path.write_text("[\n{")
    with pytest.raises(SelectionError, match="bad.json:2: not valid JSON"):
        read_golden(path)


# -- diversity-aware selection ---------------------------------------------------------------------


def _planted_clusters():
    """40 candidates in 4 tight, mutually orthogonal clusters of 10; every score of cluster k is above
    every score of cluster k + 1, so a score-only rule takes its picks from cluster 0."""
    rng = np.random.default_rng(0)
    embeddings = np.concatenate([10 * np.eye(4)[k] + rng.normal(0, 0.1, (10, 4)) for k in range(4)])
    values = np.concatenate([np.linspace(1.0 - 0.2 * k, 0.9 - 0.2 * k, 10) for k in range(4)])
    permutation = rng.permutation(40)  # positions must not matter
    return values[permutation], embeddings[permutation], (np.arange(40) // 10)[permutation]


@pytest.mark.parametrize("method", select_lib.DIVERSITY_METHODS)
def test_diversity_picks_across_planted_clusters(method):
    values, embeddings, cluster = _planted_clusters()
    diverse = select_lib.SelectionRule(top_n=4, diversity=select_lib.Diversity(0.5, method, shortlist=10))
    short = diverse.shortlist(values)
    assert short.size == 40 and list(short) == list(select_lib.rank_order(values))
    picked = diverse.select(values, embeddings[short])
    assert sorted(cluster[picked]) == [0, 1, 2, 3]
    assert picked[0] == select_lib.rank_order(values)[0]  # the best candidate first
    # Score only, or a small trade-off: the four best, all of cluster 0.
    plain = select_lib.SelectionRule(top_n=4).select(values)
    assert set(cluster[plain]) == {0}
    nearly_plain = select_lib.SelectionRule(top_n=4, diversity=select_lib.Diversity(0.05, method, shortlist=10))
    np.testing.assert_array_equal(nearly_plain.select(values, embeddings[short]), plain)


def test_facility_location_on_a_sampled_coverage_still_spreads(monkeypatch):
    # A shortlist longer than FACILITY_CLIENTS: coverage is measured on a sample of 12 of the 40.
    monkeypatch.setattr(select_lib, "FACILITY_CLIENTS", 12)
    values, embeddings, cluster = _planted_clusters()
    picked = select_lib.diverse_order(values, embeddings, 4, select_lib.Diversity(0.5, "facility_location"))
    assert sorted(cluster[picked]) == [0, 1, 2, 3]


def test_k_center_picks_are_the_farthest_point_rule():
    # trade_off 1: after the best candidate, each pick is the one farthest (cosine) from every pick so far.
    rng = np.random.default_rng(3)
    values, embeddings = rng.normal(size=30), rng.normal(size=(30, 5))
    picked = select_lib.diverse_order(values, embeddings, 6, select_lib.Diversity(1.0, "k_center"))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    assert picked[0] == np.argmax(values)  # every distance is 2 before the first pick: the score decides
    for step in range(1, 6):
        distance = (1 - unit @ unit[picked[:step]].T).min(axis=1)
        distance[picked[:step]] = -1
        assert picked[step] == np.argmax(distance)


def test_diversity_stays_in_the_shortlist_and_is_validated():
    values, embeddings, cluster = _planted_clusters()
    rule = select_lib.SelectionRule(top_n=4, diversity=select_lib.Diversity(1.0, "k_center", shortlist=5))
    short = rule.shortlist(values)
    assert short.size == 20 and set(cluster[short]) == {0, 1}  # the best 5 x 4
    picked = rule.select(values, embeddings[short])
    assert set(picked) <= set(short) and set(cluster[picked]) == {0, 1} and len(set(picked)) == 4
    with pytest.raises(select_lib.SelectionError, match="embeddings of its shortlist"):
        rule.select(values)
    with pytest.raises(select_lib.SelectionError, match="not threshold"):
        select_lib.SelectionRule(threshold=0.5, diversity=select_lib.Diversity(0.5))
    for bad, match in (
        ({"trade_off": 1.5}, "diversity must be"),
        ({"trade_off": 0.5, "method": "x"}, "diversity_method"),
    ):
        with pytest.raises(select_lib.SelectionError, match=match):
            select_lib.Diversity(**bad)
    rule = select_lib.SelectionRule.from_config({"top_n": 3, "diversity": 0.3, "diversity_method": "facility_location"})
    assert rule.diversity == select_lib.Diversity(0.3, "facility_location", 4.0)
    assert "diversity 0.3" in rule.describe()
    assert select_lib.SelectionRule.from_config({"top_n": 3, "diversity": 0.0}).diversity is None
