"""Metrics on hand-computed score matrices, task subsets, NaN rows, errors, and AUROC."""

import math

import numpy as np
import pytest

from nuggets_jax.metrics import METRIC_FORMULAS, METRICS, MetricError, auroc, compute_all, compute_metric


def _hand_store() -> dict[str, np.ndarray]:
    # C = 2 candidates, T = 3 tasks; numbers chosen so every per-task term is easy by hand.
    return {
        "zero_logp": np.array([-10.0, -20.0, -6.0], dtype=np.float32),
        "zero_correct": np.array([2, 5, 1]),
        "n_tokens": np.array([5, 10, 3]),
        "one_logp": np.array([[-5.0, -20.0, -9.0], [-10.0, -10.0, -3.0]], dtype=np.float32),
        "one_correct": np.array([[3, 5, 0], [2, 8, 3]]),
    }


def _random_store(rng: np.random.Generator, num_candidates: int = 6, num_tasks: int = 7) -> dict[str, np.ndarray]:
    n_tokens = rng.integers(1, 30, size=num_tasks)
    return {
        "zero_logp": -rng.uniform(0.5, 3.0, size=num_tasks) * n_tokens,
        "zero_correct": rng.integers(0, n_tokens + 1),
        "n_tokens": n_tokens,
        "one_logp": -rng.uniform(0.5, 3.0, size=(num_candidates, num_tasks)) * n_tokens,
        "one_correct": rng.integers(0, n_tokens + 1, size=(num_candidates, num_tasks)),
    }


e = math.e
HAND_EXPECTED = {
    # row 0: win, tie (not a win), loss; row 1: tie, win, win.
    "win_rate": [1 / 3, 2 / 3],
    # row 0: 5/5, 0/10, -3/3; row 1: 0/5, 10/10, 3/3.
    "mean_logp_gain": [0.0, 2 / 3],
    # exp(-zero/n) = e^2 for every task; exp(-one/n): row 0 e^1, e^2, e^3; row 1 e^2, e^1, e^1.
    "mean_ppl_drop": [((e**2 - e) + 0 + (e**2 - e**3)) / 3, (0 + (e**2 - e) + (e**2 - e)) / 3],
    # row 0: 1/5, 0/10, -1/3; row 1: 0/5, 3/10, 2/3.
    "token_acc_gain": [(1 / 5 + 0 - 1 / 3) / 3, (0 + 3 / 10 + 2 / 3) / 3],
}


@pytest.mark.parametrize("name", METRICS)
def test_metric_on_hand_computed_matrix(name):
    result = compute_metric(name, _hand_store())
    assert result.dtype == np.float64
    assert result.shape == (2,)
    np.testing.assert_allclose(result, HAND_EXPECTED[name], rtol=1e-12, atol=1e-12)


def test_every_metric_has_a_formula_and_compute_all_matches():
    assert set(METRIC_FORMULAS) == set(METRICS)
    store = _hand_store()
    everything = compute_all(store)
    assert list(everything) == list(METRICS)
    for name in METRICS:
        np.testing.assert_array_equal(everything[name], compute_metric(name, store))


def test_hand_matrix_on_a_column_subset():
    # Tasks 0 and 2 only: row 0 wins task 0, loses task 2; row 1 ties task 0, wins task 2.
    np.testing.assert_allclose(compute_metric("win_rate", _hand_store(), [0, 2]), [0.5, 0.5])
    np.testing.assert_allclose(compute_metric("mean_logp_gain", _hand_store(), [2]), [-1.0, 1.0])


@pytest.mark.parametrize("name", METRICS)
@pytest.mark.parametrize("columns", [[4, 0, 2], [6], np.array([True, False, True, True, False, False, True])])
def test_column_subset_equals_metric_of_sliced_store(name, columns):
    store = _random_store(np.random.default_rng(0))
    index = np.flatnonzero(columns) if np.asarray(columns).dtype == bool else np.asarray(columns)
    sliced = {key: (value[:, index] if value.ndim == 2 else value[index]) for key, value in store.items()}
    np.testing.assert_allclose(compute_metric(name, store, columns), compute_metric(name, sliced), rtol=1e-14)


def test_win_rate_is_strict_on_ties():
    store = _hand_store()
    store["one_logp"] = np.tile(store["zero_logp"], (2, 1))
    np.testing.assert_array_equal(compute_metric("win_rate", store), [0.0, 0.0])
    store["one_logp"] = store["one_logp"] + np.float32(0.5)
    np.testing.assert_array_equal(compute_metric("win_rate", store), [1.0, 1.0])


def test_nan_rows_propagate_without_touching_other_rows():
    store = _hand_store()
    store["one_logp"] = store["one_logp"].astype(np.float64)
    store["one_logp"][1] = np.nan  # candidate 1 not scored yet; its one_correct stays integer 0
    store["one_correct"][1] = 0
    for name in METRICS:
        result = compute_metric(name, store)
        assert np.isnan(result[1]), name
        np.testing.assert_allclose(result[0], HAND_EXPECTED[name][0], rtol=1e-12, atol=1e-12)


def test_npz_file_is_a_score_store(tmp_path):
    store = _hand_store()
    np.savez(tmp_path / "scores.npz", **store, task_ids=np.array(["a", "b", "c"]))
    with np.load(tmp_path / "scores.npz") as loaded:
        np.testing.assert_allclose(compute_metric("mean_logp_gain", loaded), HAND_EXPECTED["mean_logp_gain"])


def test_unknown_metric_lists_known_ones():
    with pytest.raises(MetricError, match="unknown metric 'accuracy'.*win_rate.*token_acc_gain"):
        compute_metric("accuracy", _hand_store())
    assert issubclass(MetricError, ValueError)


@pytest.mark.parametrize("columns", [[], np.zeros(3, dtype=bool)])
def test_empty_task_subset_is_an_error(columns):
    with pytest.raises(MetricError, match="task subset is empty"):
        compute_metric("win_rate", _hand_store(), columns)


def test_bad_columns_are_errors():
    with pytest.raises(MetricError, match="out of range"):
        compute_metric("win_rate", _hand_store(), [0, 3])
    with pytest.raises(MetricError, match="length 2 .* 3 task columns"):
        compute_metric("win_rate", _hand_store(), np.array([True, False]))


def test_non_positive_n_tokens_names_the_task_column():
    store = _hand_store()
    store["n_tokens"] = np.array([5, 0, 3])
    with pytest.raises(MetricError, match="task column 1 .*n_tokens = 0"):
        compute_metric("mean_logp_gain", store)
    store["task_ids"] = np.array(["t-a", "t-b", "t-c"])
    with pytest.raises(MetricError, match="task column 1 \\(id 't-b'\\)"):
        compute_metric("win_rate", store)
    # A column outside the subset does not matter.
    np.testing.assert_allclose(compute_metric("win_rate", store, [0, 2]), [0.5, 0.5])


def test_malformed_store_is_an_error():
    store = _hand_store()
    del store["one_correct"]
    with pytest.raises(MetricError, match="lacks one_correct"):
        compute_metric("win_rate", store)
    store = _hand_store()
    store["one_logp"] = store["one_logp"][:, :2]
    with pytest.raises(MetricError, match="one_logp has shape"):
        compute_metric("win_rate", store)


def _pairwise_auroc(scores, positive):
    # The definition, O(n^2): over all (positive, negative) pairs, 1 for a higher positive, 1/2 for a tie.
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return total / (len(pos) * len(neg))


def test_auroc_with_ties_matches_pairwise_count():
    scores = [0.5, 0.5, 0.2, 0.9, 0.2, 0.5, 0.1, 0.9]
    positive = [True, False, True, True, False, False, False, False]
    # By hand: positives 0.5, 0.2, 0.9 vs negatives 0.5, 0.2, 0.5, 0.1, 0.9:
    # 0.5 -> 0.5+1+0.5+1+0 = 3; 0.2 -> 0+0.5+0+1+0 = 1.5; 0.9 -> 1+1+1+1+0.5 = 4.5; 9/15.
    assert auroc(scores, positive) == pytest.approx(9 / 15, abs=1e-12)
    assert auroc(scores, positive) == pytest.approx(_pairwise_auroc(scores, positive), abs=1e-12)


def test_auroc_random_ties_match_pairwise_count():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 5, size=40).astype(float)  # few distinct values: many ties
        positive = rng.random(40) < 0.3
        if positive.all() or not positive.any():
            continue
        assert auroc(scores, positive) == pytest.approx(_pairwise_auroc(scores, positive), abs=1e-12)


def test_auroc_extremes_and_empty_class():
    assert auroc([3, 4, 1, 2], [True, True, False, False]) == 1.0
    assert auroc([3, 4, 1, 2], [0, 0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert math.isnan(auroc([1, 2, 3], [False, False, False]))
    assert math.isnan(auroc([1, 2, 3], [True, True, True]))
    assert math.isnan(auroc([1, np.nan, 3], [True, False, True]))
    with pytest.raises(MetricError, match="same length"):
        auroc([1, 2, 3], [True, False])
    with pytest.raises(MetricError, match="booleans or 0/1"):
        auroc([1, 2, 3], [0, 2, 1])
