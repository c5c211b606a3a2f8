"""Ranking candidates by a golden score, choosing the golden set, and writing both.

Outputs of a scoring run (docs/ARCHITECTURE.md, "The workdir of a scoring run"):
- `ranking.jsonl`: one line per candidate in rank order, `{"rank", "id", <metrics>, <extra fields>}`.
- `golden.json`: the selected records in the input format, each with a `"nuggets"` field
  `{"rank", <metrics>}`; `read_golden` strips that field so the golden set is a valid pool file.

Ranks are deterministic: higher values first, ties broken by record position, NaN (not scored)
last. Non-finite metric values are written as JSON null.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax.errors import UserError

# Record fields that are the example itself; everything else is carried into ranking.jsonl.
_EXAMPLE_FIELDS = ("instruction", "input", "output", "id")
GOLDEN_FIELD = "nuggets"
_CRITERIA = ("top_n", "top_fraction", "threshold")
DEFAULT_TOP_FRACTION = 0.1  # the golden set when the config sets no criterion


class SelectionError(UserError):
    """A selection criterion, ranking input or golden file that cannot be used."""


def _as_values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise SelectionError(f"values must be one score per candidate [C], got shape {array.shape}")
    return array


def rank_order(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Orders candidates best first.

    Args:
      values: [C] scores, higher is better.

    Returns:
      [C] int64 candidate indices, best first; equal values keep position order (lower index
      first) and NaN values come last, also in position order.
    """
    array = _as_values(values)
    is_nan = np.isnan(array)
    # lexsort's last key is the primary one: NaN flag, then descending value, then position.
    descending = np.where(is_nan, 0.0, -array)
    return np.lexsort((np.arange(array.size), descending, is_nan)).astype(np.int64)


def ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Gives each candidate its 1-based rank under `rank_order`.

    Args:
      values: [C] scores, higher is better.

    Returns:
      [C] int64 ranks; `ranks(v)[rank_order(v)[0]] == 1`.
    """
    order = rank_order(values)
    result = np.empty(order.size, dtype=np.int64)
    result[order] = np.arange(1, order.size + 1)
    return result


@dataclasses.dataclass(frozen=True)
class SelectionRule:
    """How the golden set is chosen: exactly one of the best `top_n`, the best `top_fraction`, or
    every candidate whose value is >= `threshold`. Validated on construction.

    Attributes:
      top_n: keep the best `top_n` (>= 1; more than C keeps all).
      top_fraction: keep the best ceil(top_fraction * C), top_fraction in (0, 1]. The fraction is
        read as the decimal it prints as, so 0.1 of 30 is 3, not 4.
      threshold: keep every candidate with value >= threshold.
    """

    top_n: int | None = None
    top_fraction: float | None = None
    threshold: float | None = None

    def __post_init__(self):
        given = self.as_dict()
        if len(given) != 1:
            which = "none was set" if not given else f"got {', '.join(sorted(given))}"
            raise SelectionError(f"set exactly one selection criterion of top_n, top_fraction or threshold ({which})")
        top_n, top_fraction, threshold = self.top_n, self.top_fraction, self.threshold
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int | np.integer) or top_n < 1):
            raise SelectionError(f"top_n must be a positive integer, got {top_n!r}")
        if top_fraction is not None and (isinstance(top_fraction, bool) or not 0.0 < float(top_fraction) <= 1.0):
            raise SelectionError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
        if threshold is not None and math.isnan(float(threshold)):
            raise SelectionError("threshold must be a number, got NaN")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SelectionRule:
        """From a config's `select` section; `top_fraction=DEFAULT_TOP_FRACTION` when none is set."""
        given = {key: config.get(key) for key in _CRITERIA if config.get(key) is not None}
        if len(given) > 1:
            raise SelectionError(f"set only one of select.top_n / select.top_fraction / select.threshold, got {given}.")
        try:
            return cls(**given) if given else cls(top_fraction=DEFAULT_TOP_FRACTION)
        except SelectionError as error:
            raise SelectionError(f"select.{error}; fix it in the config or on the command line.") from None

    def as_dict(self) -> dict[str, float | int]:
        """The one criterion set, as `{name: value}` (run.json's "selection")."""
        return {key: value for key in _CRITERIA if (value := getattr(self, key)) is not None}

    def count(self, num_candidates: int) -> int | None:
        """How many of `num_candidates` a top rule keeps (unscored ones aside); None for a threshold."""
        if self.top_n is not None:
            return min(int(self.top_n), num_candidates)
        if self.top_fraction is not None:
            # Via the decimal repr: 0.1 * 30 is 3.0000000000000004 in binary floating point.
            return min(math.ceil(fractions.Fraction(repr(float(self.top_fraction))) * num_candidates), num_candidates)
        return None

    def select(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """Chooses the golden set; candidates whose value is NaN (not scored) are never selected.

        Args:
          values: [C] scores, higher is better.

        Returns:
          [N] int64 indices of the selected candidates, in rank order.
        """
        array = _as_values(values)
        order = rank_order(array)
        count = self.count(array.size)
        chosen = order[:count] if count is not None else order[array[order] >= float(self.threshold)]
        return chosen[~np.isnan(array[chosen])]

    def describe(self) -> str:
        """The rule as its config field says it, e.g. "top_fraction = 0.1" (report.md's wording)."""
        ((name, value),) = self.as_dict().items()
        return f"{name} = {value}"


def select(
    values: Sequence[float] | np.ndarray,
    top_n: int | None = None,
    top_fraction: float | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """Chooses the golden set by exactly one criterion: `SelectionRule(...).select(values)`.

    Raises:
      SelectionError: not exactly one criterion set, or an out-of-range criterion.
    """
    array = _as_values(values)
    return SelectionRule(top_n, top_fraction, threshold).select(array)


def _json_number(value: float) -> float | None:
    """JSON has no NaN or infinity; those become null."""
    value = float(value)
    return value if math.isfinite(value) else None


def _check_metrics(
    records: Sequence[Mapping[str, Any]], metrics: Mapping[str, np.ndarray], rank_metric: str
) -> dict[str, np.ndarray]:
    if rank_metric not in metrics:
        raise SelectionError(f"rank metric {rank_metric!r} is not among the metrics: {', '.join(metrics)}")
    checked = {}
    for name, values in metrics.items():
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (len(records),):
            raise SelectionError(
                f"metric {name!r} has shape {array.shape} but there are {len(records)} candidate records"
            )
        checked[name] = array
    return checked


def _record_id(record: Mapping[str, Any], index: int) -> Any:
    # docs/ARCHITECTURE.md: a record without an id is known by its 0-based position.
    return record.get("id", index)


def _write_atomically(path: str | os.PathLike[str], text: str) -> pathlib.Path:
    """Writes UTF-8 text so that readers see the old file or the new one, never a partial one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain open (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_path, "wb") as handle:
            handle.write(text.encode("utf-8"))
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def write_ranking(
    path: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, np.ndarray],
    rank_metric: str,
) -> pathlib.Path:
    """Writes ranking.jsonl: one JSON line per candidate, best first.

    Each line is `{"rank": r, "id": id, <every metric>: value, <every extra field>: value}`, where
    extra fields are the record's fields other than instruction, input, output and id.

    Args:
      path: output file.
      records: [C] candidate records as read from the input.
      metrics: metric name -> [C] values (e.g. `metrics.compute_all(...)`).
      rank_metric: the metric that orders the lines.

    Returns:
      The path written.

    Raises:
      SelectionError: unknown rank metric, metric length mismatch, or an extra field whose name
        clashes with "rank" or a metric name.
    """
    checked = _check_metrics(records, metrics, rank_metric)
    rank_of = ranks(checked[rank_metric])
    reserved = {"rank", *checked}
    lines = []
    for index in rank_order(checked[rank_metric]):
        record = records[index]
        line: dict[str, Any] = {"rank": int(rank_of[index]), "id": _record_id(record, int(index))}
        for name, values in checked.items():
            line[name] = _json_number(values[index])
        for field, value in record.items():
            if field in _EXAMPLE_FIELDS:
                continue
            if field in reserved:
                raise SelectionError(
                    f"record {index} (id {line['id']!r}): field {field!r} clashes with a ranking column; "
                    "rename it in the input file"
                )
            line[field] = value
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    return _write_atomically(path, "".join(lines))


def read_ranking(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads ranking.jsonl back: one dict per candidate, in rank order.

    Args:
      path: a file written by `write_ranking`.

    Returns:
      The lines as dicts (`{"rank", "id", <metrics>, <extra fields>}`, null for a non-finite
      value), sorted by "rank" (stable; a line without an integer rank goes last).

    Raises:
      SelectionError: the file is missing, or a line is not a JSON object.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise SelectionError(f"{path}: not found; run the scoring into this workdir first")
    lines = []
    for where, line in data_lib.read_objects(path, "the ranking file", error=SelectionError):
        if not isinstance(line, dict):
            raise SelectionError(f"{where}: expected a JSON object, got {type(line).__name__}; rerun the scoring")
        lines.append(line)
    # Written in rank order; sorting (stable) only guards against a hand-edited file.
    return sorted(lines, key=lambda line: r if isinstance(r := line.get("rank"), int) else math.inf)


def write_golden(
    path: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    selected: Sequence[int] | np.ndarray,
    metrics: Mapping[str, np.ndarray],
    rank_metric: str,
) -> pathlib.Path:
    """Writes golden.json: the selected records in the input format, best first, with their scores.

    Each record keeps all its fields and gains `"nuggets": {"rank": r, <every metric>: value}`,
    where r is its rank among all candidates by `rank_metric`.

    Args:
      path: output file (written atomically).
      records: [C] candidate records as read from the input.
      selected: indices of the golden set (e.g. from `select`); written in rank order.
      metrics: metric name -> [C] values.
      rank_metric: the metric the ranks refer to.

    Returns:
      The path written.

    Raises:
      SelectionError: bad metrics, out-of-range or repeated indices, or a record that already has
        a "nuggets" field.
    """
    checked = _check_metrics(records, metrics, rank_metric)
    rank_of = ranks(checked[rank_metric])
    chosen = np.asarray(selected)
    if chosen.ndim != 1 or (chosen.size and not np.issubdtype(chosen.dtype, np.integer)):
        raise SelectionError(f"selected must be 1-D integer candidate indices, got {chosen.dtype} {chosen.shape}")
    chosen = chosen.astype(np.int64)
    if chosen.size and (chosen.min() < 0 or chosen.max() >= len(records)):
        raise SelectionError(f"selected indices must lie in [0, {len(records)}), got {chosen.min()}..{chosen.max()}")
    if np.unique(chosen).size != chosen.size:
        raise SelectionError("selected indices repeat a candidate; each record may be selected once")
    output = []
    for index in sorted(chosen.tolist(), key=lambda i: rank_of[i]):
        record = records[index]
        if GOLDEN_FIELD in record:
            raise SelectionError(
                f"record {index} (id {_record_id(record, index)!r}) already has a {GOLDEN_FIELD!r} field; "
                "remove it from the input (read_golden strips it from a golden.json)"
            )
        scores = {"rank": int(rank_of[index])}
        scores.update({name: _json_number(values[index]) for name, values in checked.items()})
        output.append({**record, GOLDEN_FIELD: scores})
    return _write_atomically(path, json.dumps(output, ensure_ascii=False, indent=2) + "\n")


def read_golden(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads golden.json back as plain records (the "nuggets" scores removed), in rank order.

    Args:
      path: a file written by `write_golden`.

    Returns:
      The records with their original fields, usable as a pool or training file.

    Raises:
      SelectionError: the file is not a JSON list of objects.
    """
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SelectionError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(data, list):
        raise SelectionError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    records = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise SelectionError(f"{path}: record {index} is {type(item).__name__}, expected a JSON object")
        records.append({key: value for key, value in item.items() if key != GOLDEN_FIELD})
    return records
