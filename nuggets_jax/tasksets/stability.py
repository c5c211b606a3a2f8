"""How much a golden-score ranking moves when the task set changes (pure NumPy/SciPy).

A variant's scores [C] are compared with a reference ranking's scores [C] of the same candidates:
rank correlations (Spearman, Kendall tau-b, over candidates where both are finite) and the
Jaccard overlap of the selected top fractions. The top n = max(1, ceil(fraction x C)) follows the
selection rule of the scoring job (`select.rank_order`): higher first, ties by position, NaN
last, so an overlap of 1 means both task sets would select the same golden set.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from nuggets_jax.metrics import spearman
from nuggets_jax.select import SelectionRule, rank_order

DEFAULT_FRACTIONS = (0.01, 0.05, 0.1)


def _pair(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two [C] score vectors of the same length, got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _correlation(function, a, b) -> float:
    a, b = _pair(a, b)
    # A constant vector has no ranking; SciPy warns and returns NaN, which is the answer.
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(function(a, b).statistic)


def kendall(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b (corrected for ties) over pairs where both are finite; NaN if undefined."""
    return _correlation(stats.kendalltau, a, b)


def top_count(num_candidates: int, fraction: float) -> int:
    """Candidates in the top `fraction`: the scoring job's rule (`select.SelectionRule`), at least 1."""
    return max(1, SelectionRule(top_fraction=fraction).count(num_candidates))


def top_set(values: Sequence[float] | np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the top `fraction` of candidates, best first: higher first, ties by position, NaN last."""
    return rank_order(values)[: top_count(len(values), fraction)]


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """|A and B| / |A or B|; 1 for two empty sets."""
    a, b = set(int(x) for x in a), set(int(x) for x in b)
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def top_overlap(
    values: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray, fraction: float
) -> float:
    """Jaccard overlap of the top `fraction` under `values` and under `reference`."""
    values, reference = np.asarray(values), np.asarray(reference)
    if values.shape != reference.shape:
        raise ValueError(f"need two [C] score vectors of the same length, got {values.shape} and {reference.shape}")
    return jaccard(top_set(values, fraction), top_set(reference, fraction))


def fraction_label(fraction: float) -> str:
    """'top_1%' for 0.01: the key of an overlap in `compare`'s result."""
    return f"top_{fraction * 100:g}%"


def compare(
    values: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, float]:
    """Every stability number of one variant against the reference.

    Returns:
      {"spearman", "kendall", "top_1%", "top_5%", "top_10%"} (one top key per fraction).
    """
    out = {"spearman": spearman(values, reference), "kendall": kendall(values, reference)}
    for fraction in fractions:
        out[fraction_label(fraction)] = top_overlap(values, reference, fraction)
    return out


def task_cost(
    task_lengths: Sequence[int] | np.ndarray, columns: Sequence[int] | np.ndarray, num_candidates: int
) -> int:
    """Task tokens a scoring run of these task columns processes: sum of their lengths x candidates."""
    lengths = np.asarray(task_lengths, np.int64)
    return int(lengths[np.asarray(columns, np.int64)].sum()) * int(num_candidates)


def correlation_matrix(values: Mapping[str, Sequence[float] | np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Spearman between every pair of score vectors (e.g. metrics on the same tasks).

    Returns:
      (names, [n, n] matrix with 1 on the diagonal, NaN where undefined).
    """
    names = list(values)
    matrix = np.eye(len(names))
    for i, j in zip(*np.triu_indices(len(names), 1), strict=True):
        matrix[i, j] = matrix[j, i] = spearman(values[names[i]], values[names[j]])
    for i, name in enumerate(names):
        _, finite = _pair(values[name], values[name])
        if finite.size < 2 or np.all(finite == finite[0]):
            matrix[i, i] = np.nan
    return names, matrix


def summarize(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, sample standard deviation and count of `keys` over the rows of each group (e.g. seeds).

    NaN values are left out of a group's statistics; groups keep their first-seen order.

    Returns:
      One dict per group: the group_by values, then "<key>_mean", "<key>_std" (NaN for one value),
      "<key>_n" for every key, and "rows" (the group's size).
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[g] for g in group_by), []).append(row)
    out = []
    for group, members in groups.items():
        entry: dict[str, Any] = dict(zip(group_by, group, strict=True))
        for key in keys:
            v = np.asarray([m[key] for m in members], np.float64)
            v = v[np.isfinite(v)]
            entry[f"{key}_mean"] = float(v.mean()) if v.size else float("nan")
            entry[f"{key}_std"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
            entry[f"{key}_n"] = int(v.size)
        entry["rows"] = len(members)
        out.append(entry)
    return out
