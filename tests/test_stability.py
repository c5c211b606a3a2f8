"""Stability numbers against hand-computed tiny cases."""

import math

import numpy as np
import pytest

from nuggets_jax.tasksets import stability as stability


def test_spearman_and_kendall_by_hand():
    a = [1.0, 2.0, 3.0, 4.0]
    assert stability.spearman(a, a) == pytest.approx(1.0)
    assert stability.kendall(a, a[::-1]) == pytest.approx(-1.0)
    # One adjacent swap: sum d^2 = 2 -> rho = 1 - 6*2/(4*15) = 0.8; 5 concordant, 1 discordant -> tau = 4/6.
    b = [1.0, 3.0, 2.0, 4.0]
    assert stability.spearman(a, b) == pytest.approx(0.8)
    assert stability.kendall(a, b) == pytest.approx(4 / 6)


def test_correlations_skip_nan_and_constant():
    a = [1.0, 2.0, np.nan, 3.0]
    b = [2.0, 4.0, 1.0, 6.0]
    assert stability.spearman(a, b) == pytest.approx(1.0)  # the NaN pair is dropped
    assert math.isnan(stability.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(stability.kendall([1.0], [2.0]))
    with pytest.raises(ValueError, match="same length"):
        stability.spearman([1.0, 2.0], [1.0])


def test_kendall_tau_b_with_ties_by_hand():
    # a has one tied pair. Pairs: (0,1) tie in a; (0,2),(1,2) concordant; n0 = 3, ties_a = 1, ties_b = 0.
    a = [1.0, 1.0, 2.0]
    b = [1.0, 2.0, 3.0]
    assert stability.kendall(a, b) == pytest.approx(2 / math.sqrt((3 - 1) * 3))


def test_top_count_and_set():
    assert stability.top_count(30, 0.1) == 3
    assert stability.top_count(30, 0.01) == 1
    assert stability.top_count(200, 0.05) == 10
    assert stability.top_count(7, 0.5) == 4
    # Ties go to the earlier position; NaN last.
    values = [0.5, 0.9, 0.9, np.nan, 0.1]
    assert stability.top_set(values, 0.4).tolist() == [1, 2]
    assert stability.top_set(values, 1.0).tolist() == [1, 2, 0, 4, 3]


def test_top_overlap_by_hand():
    values = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    reference = np.array([8.0, 9.0, 1.0, 7.0, 0.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    # Top 20% = 2 each: {0, 1} vs {1, 0} -> 1. Top 30% = 3: {0, 1, 2} vs {1, 0, 3} -> 2 / 4.
    assert stability.top_overlap(values, reference, 0.2) == pytest.approx(1.0)
    assert stability.top_overlap(values, reference, 0.3) == pytest.approx(0.5)
    assert stability.jaccard([], []) == 1.0
    out = stability.compare(values, reference, fractions=(0.2, 0.3))
    assert set(out) == {"spearman", "kendall", "top_20%", "top_30%"}
    assert out["top_30%"] == pytest.approx(0.5)


def test_task_cost_by_hand():
    assert stability.task_cost([10, 20, 30], [0, 2], 4) == (10 + 30) * 4


def test_correlation_matrix():
    names, m = stability.correlation_matrix({"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, 3.0, 2.0, 4.0], "c": [4, 3, 2, 1]})
    assert names == ["a", "b", "c"]
    np.testing.assert_allclose(m, m.T)
    assert m[0, 1] == pytest.approx(0.8) and m[0, 2] == pytest.approx(-1.0)
    np.testing.assert_allclose(np.diag(m), 1.0)


def test_summarize_by_hand():
    rows = [
        {"construction": "kmeans", "k": 5, "spearman": 0.5, "kendall": 0.2},
        {"construction": "kmeans", "k": 5, "spearman": 0.7, "kendall": np.nan},
        {"construction": "random", "k": 5, "spearman": 0.1, "kendall": 0.0},
    ]
    out = stability.summarize(rows, ("construction", "k"), ("spearman", "kendall"))
    assert [(e["construction"], e["rows"]) for e in out] == [("kmeans", 2), ("random", 1)]
    assert out[0]["spearman_mean"] == pytest.approx(0.6)
    assert out[0]["spearman_std"] == pytest.approx(math.sqrt(0.02))  # sample std of (0.5, 0.7)
    assert out[0]["kendall_mean"] == pytest.approx(0.2) and out[0]["kendall_n"] == 1
    assert math.isnan(out[1]["spearman_std"])
