"""Ranking candidates by a golden score, choosing the golden set, and writing both.

Outputs of a scoring run (docs/ARCHITECTURE.md, "The workdir of a scoring run"):
- `ranking.jsonl`: one line per candidate in rank order, `{"rank", "id", <metrics>, <extra fields>}`
  (fields that are not the example itself, `data.RECORD_COLUMNS`).
- `golden.json`: the selected records in the input format, each with a `"nuggets"` field
  `{"rank", <metrics>}`; `read_golden` strips that field so the golden set is a valid pool file.

Ranks are deterministic: higher values first, ties broken by record position, NaN (not scored)
last. Non-finite metric values are written as JSON null.

Diversity-aware selection (`Diversity`, as DEITA and Superfiltering.D do): the golden set is
picked greedily from the best `shortlist` x N candidates by score, each step taking the candidate
with the highest (1 - trade_off) * quality + trade_off * spread, where quality is its score rank
in the shortlist scaled to [0, 1] and spread its cosine distance to the nearest candidate already
picked (`k_center`) or its gain in facility-location coverage (`facility_location`, of at most
`FACILITY_CLIENTS` shortlist members), scaled by the step's largest. k_center costs O(M x D) per
pick and holds no M x M matrix, so it is the one for shortlists of hundreds of thousands. The
embeddings are the caller's (the scoring job: `scoring.embedding`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import hashlib
import json
import math
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax.errors import UserError

# Record fields that are the example itself (every record form's); everything else is carried
# into ranking.jsonl and ranking.parquet.
_EXAMPLE_FIELDS = data_lib.RECORD_COLUMNS
GOLDEN_FIELD = "nuggets"
# What `write_golden_as` writes, one per pool format: json (and generated pools), jsonl, parquet, datasets dir.
GOLDEN_NAMES = ("golden.json", "golden.jsonl", "golden.parquet", "golden")
_CRITERIA = ("top_n", "top_fraction", "threshold")
DIVERSITY_METHODS = ("k_center", "facility_location")
# Facility location measures the coverage of at most this many shortlist members (a seeded sample
# of a longer shortlist), so its memory and time per pick grow with M, not M^2.
FACILITY_CLIENTS = 4096
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
class Diversity:
    """Diversity-aware selection (module docstring). Validated on construction.

    Attributes:
      trade_off: weight of spread against score, in (0, 1]; 1 = spread only (within the shortlist).
      method: `k_center` (distance to the nearest pick) or `facility_location` (coverage gain).
      shortlist: pick from the best ceil(shortlist x N) candidates by score, shortlist >= 1.
    """

    trade_off: float
    method: str = "k_center"
    shortlist: float = 4.0

    def __post_init__(self):
        if isinstance(self.trade_off, bool) or not 0.0 < float(self.trade_off) <= 1.0:
            raise SelectionError(f"diversity must be in (0, 1] (0 = off), got {self.trade_off!r}")
        if self.method not in DIVERSITY_METHODS:
            raise SelectionError(
                f"unknown diversity_method {self.method!r}; choose one of: {', '.join(DIVERSITY_METHODS)}"
            )
        if not float(self.shortlist) >= 1.0:
            raise SelectionError(f"diversity_shortlist must be at least 1, got {self.shortlist!r}")

    def describe(self) -> str:
        return f"diversity {self.trade_off:g} ({self.method} over the best {self.shortlist:g}x)"


def diverse_order(values: np.ndarray, embeddings: np.ndarray, count: int, diversity: Diversity) -> np.ndarray:
    """Greedy diversity-aware picks among M candidates (module docstring).

    Args:
      values: [M] scores, higher is better, all finite.
      embeddings: [M, D] one vector per candidate (any scale: cosine similarity is used).
      count: how many to pick (at most M).
      diversity: the trade-off and method.

    Returns:
      [min(count, M)] int64 indices into the M, in pick order. Ties go to the better-ranked.
    """
    values = _as_values(values)
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or x.shape[0] != values.size:
        raise SelectionError(f"embeddings must be [M, D] for M={values.size} candidates, got shape {x.shape}")
    m = values.size
    # Candidates in rank order, so argmax's first-index rule breaks ties towards the better score.
    order = rank_order(values)
    x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))[order]
    quality = 1.0 - np.arange(m) / max(1, m - 1)  # [M] 1 = the best score, 0 = the shortlist's worst
    if diversity.method == "k_center":
        nearest = np.full(m, 2.0)  # cosine distance (in [0, 2]) to the nearest pick
    else:  # coverage of (a seeded sample of) the shortlist: [N, M] similarities in [0, 1]
        clients = np.arange(m)
        if m > FACILITY_CLIENTS:
            clients = np.sort(np.random.default_rng(0).choice(m, FACILITY_CLIENTS, replace=False))
        similarity = (1.0 + np.clip(x[clients] @ x.T, -1.0, 1.0)) / 2.0
        covered = np.zeros(clients.size)  # each client's best similarity to a pick
    available = np.ones(m, bool)
    picks = []
    for _ in range(min(count, m)):
        if diversity.method == "k_center":
            spread = nearest.copy()
        else:
            spread = np.maximum(similarity - covered[:, None], 0.0).sum(axis=0)  # [M] gain of each pick
        top = spread[available].max()
        spread = spread / top if top > 0 else np.zeros(m)
        gain = (1.0 - diversity.trade_off) * quality + diversity.trade_off * spread
        gain[~available] = -np.inf
        j = int(np.argmax(gain))
        picks.append(j)
        available[j] = False
        if diversity.method == "k_center":  # one [M] column per pick: no [M, M] matrix is held
            nearest = np.minimum(nearest, 1.0 - np.clip(x @ x[j], -1.0, 1.0))
        else:
            covered = np.maximum(covered, similarity[:, j])
    return order[np.asarray(picks, np.int64)]


@dataclasses.dataclass(frozen=True)
class SelectionRule:
    """How the golden set is chosen: exactly one of the best `top_n`, the best `top_fraction`, or
    every candidate whose value is >= `threshold`. Validated on construction.

    Attributes:
      top_n: keep the best `top_n` (>= 1; more than C keeps all).
      top_fraction: keep the best ceil(top_fraction * C), top_fraction in (0, 1]. The fraction is
        read as the decimal it prints as, so 0.1 of 30 is 3, not 4.
      threshold: keep every candidate with value >= threshold.
      diversity: pick the top_n / top_fraction diversity-aware (`Diversity`), None = by score only.
    """

    top_n: int | None = None
    top_fraction: float | None = None
    threshold: float | None = None
    diversity: Diversity | None = None

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
        if threshold is not None and self.diversity is not None:
            raise SelectionError(
                "diversity picks a number of candidates: use it with top_n or top_fraction, not threshold"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SelectionRule:
        """From a config's `select` section; `top_fraction=DEFAULT_TOP_FRACTION` when none is set."""
        given = {key: config.get(key) for key in _CRITERIA if config.get(key) is not None}
        if len(given) > 1:
            raise SelectionError(f"set only one of select.top_n / select.top_fraction / select.threshold, got {given}.")
        try:
            diversity = None
            if config.get("diversity"):
                diversity = Diversity(
                    config["diversity"], config.get("diversity_method") or "k_center",
                    config.get("diversity_shortlist") or 4.0,
                )  # fmt: skip
            given = given or {"top_fraction": DEFAULT_TOP_FRACTION}
            return cls(**given, diversity=diversity)
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

    def shortlist(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """The candidates a diversity-aware rule picks from: the best ceil(shortlist x N) scored ones,
        in rank order (all scored candidates without diversity)."""
        array = _as_values(values)
        order = rank_order(array)
        order = order[~np.isnan(array[order])]
        if self.diversity is None:
            return order
        count = self.count(array.size)
        return order[: min(order.size, math.ceil(self.diversity.shortlist * count))]

    def select(self, values: Sequence[float] | np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Chooses the golden set; candidates whose value is NaN (not scored) are never selected.

        Args:
          values: [C] scores, higher is better.
          embeddings: with `diversity`: [M, D] embeddings of the `shortlist(values)` candidates, in
            that order.

        Returns:
          [N] int64 indices of the selected candidates, in rank order (with diversity: pick order).
        """
        array = _as_values(values)
        if self.diversity is not None:
            short = self.shortlist(array)
            if embeddings is None:
                raise SelectionError("a diversity-aware rule needs the embeddings of its shortlist")
            return short[diverse_order(array[short], embeddings, self.count(array.size), self.diversity)]
        order = rank_order(array)
        count = self.count(array.size)
        chosen = order[:count] if count is not None else order[array[order] >= float(self.threshold)]
        return chosen[~np.isnan(array[chosen])]

    def describe(self) -> str:
        """The rule as its config field says it, e.g. "top_fraction = 0.1" (report.md's wording)."""
        ((name, value),) = self.as_dict().items()
        return f"{name} = {value}" + (f", {self.diversity.describe()}" if self.diversity else "")


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


@contextlib.contextmanager
def _replacing(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary file beside `path` that replaces it when the block succeeds (removed if not), so
    readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain path (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _write_atomically(path: str | os.PathLike[str], text: str) -> pathlib.Path:
    """Writes UTF-8 text so that readers see the old file or the new one, never a partial one."""
    path = pathlib.Path(path)
    with _replacing(path) as tmp_path, open(tmp_path, "wb") as handle:
        handle.write(text.encode("utf-8"))
    return path


def write_ranking(
    path: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, np.ndarray],
    rank_metric: str,
) -> pathlib.Path:
    """Writes ranking.jsonl: one JSON line per candidate, best first.

    Each line is `{"rank": r, "id": id, <every metric>: value, <every extra field>: value}`, where
    extra fields are the record's fields other than the example's own (`data.RECORD_COLUMNS`: id,
    instruction, input, output, system, history, messages, conversations).

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
    output = [
        {**records[index], GOLDEN_FIELD: scores}
        for index, scores in _golden_scores(records, selected, metrics, rank_metric)
    ]
    return _write_atomically(path, json.dumps(output, ensure_ascii=False, indent=2) + "\n")


def _golden_scores(
    records: Sequence[Mapping[str, Any]],
    selected: Sequence[int] | np.ndarray,
    metrics: Mapping[str, np.ndarray],
    rank_metric: str,
) -> list[tuple[int, dict[str, Any]]]:
    """(candidate index, `{"rank", <metrics>}`) of the golden set, in rank order, validated."""
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
        output.append((index, scores))
    return output


def read_golden(path: str | os.PathLike[str], *, keep_scores: bool = False) -> list[dict[str, Any]]:
    """Reads a golden set back as plain records (the "nuggets" scores removed), in rank order.

    Args:
      path: a golden file of any kind `write_golden_as` writes: golden.json, golden.jsonl,
        golden.parquet or the golden/ datasets directory.
      keep_scores: keep each record's "nuggets" scores (`{"rank", <metrics>}`).

    Returns:
      The records with their original fields, usable as a pool or training file.

    Raises:
      SelectionError: the file is not a list of objects (JSON) or not readable.
    """
    path = pathlib.Path(path)
    if data_lib.files.file_kind(path) != "json":
        objects = data_lib.read_objects(path, "the golden set path", error=SelectionError, what="golden set")
        records = []
        for where, item in objects:
            if not isinstance(item, dict):
                raise SelectionError(f"{where}: expected a JSON object, got {type(item).__name__}; rerun the scoring")
            records.append(item if keep_scores else {k: v for k, v in item.items() if k != GOLDEN_FIELD})
        return records
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
        records.append(item if keep_scores else {key: value for key, value in item.items() if key != GOLDEN_FIELD})
    return records


def golden_path(workdir: str | os.PathLike[str]) -> pathlib.Path:
    """The golden set a scoring run wrote into `workdir`: golden.json, .jsonl, .parquet or golden/.

    Raises:
      SelectionError: the workdir holds none of them.
    """
    workdir = pathlib.Path(workdir)
    for name in GOLDEN_NAMES:
        if (workdir / name).exists():
            return workdir / name
    raise SelectionError(
        f"{workdir}: no golden set ({', '.join(GOLDEN_NAMES)}/); run the scoring into this workdir first"
    )


def write_golden_as(
    workdir: str | os.PathLike[str],
    source: str | os.PathLike[str] | None,
    records: Sequence[Mapping[str, Any]],
    selected: Sequence[int] | np.ndarray,
    metrics: Mapping[str, np.ndarray],
    rank_metric: str,
) -> pathlib.Path:
    """Writes the golden set into `workdir` in the pool's own format, best first, with its scores.

    json (or a generated pool): golden.json (`write_golden`). jsonl: golden.jsonl, the same
    objects one a line. parquet: golden.parquet, the selected source rows whole plus a `nuggets`
    struct column `{rank: int64, <metric>: float64}` (null for a non-finite value). A datasets
    directory: golden/, a save_to_disk directory of those rows (`datasets.load_from_disk` reads it).
    Golden files of the other kinds left in `workdir` by an earlier run are removed.

    Args:
      workdir: the run's workdir.
      source: the pool file or directory; None for a generated pool.
      records: [C] candidate records; candidate i is row i of `source` (the pool is only cut to
        its first C rows).
      selected: indices of the golden set; written in rank order.
      metrics: metric name -> [C] values.
      rank_metric: the metric the ranks refer to.

    Returns:
      The path written.

    Raises:
      SelectionError: bad metrics or indices, a record or source row that already has a
        "nuggets" field, or a source that changed since it was read.
    """
    workdir = pathlib.Path(workdir)
    kind = "json" if source is None else data_lib.files.file_kind(source)
    if kind == "json":
        path = write_golden(workdir / "golden.json", records, selected, metrics, rank_metric)
    elif kind == "jsonl":
        scored = _golden_scores(records, selected, metrics, rank_metric)
        lines = [json.dumps({**records[i], GOLDEN_FIELD: scores}, ensure_ascii=False) + "\n" for i, scores in scored]
        path = _write_atomically(workdir / "golden.jsonl", "".join(lines))
    else:
        import pyarrow as pa

        scored = _golden_scores(records, selected, metrics, rank_metric)
        positions = [index for index, _ in scored]
        table = _source_rows(source, records, positions)
        if GOLDEN_FIELD in table.column_names:
            raise SelectionError(
                f"{source}: already has a {GOLDEN_FIELD!r} column; drop it from the input "
                "(read_golden strips it from a golden set)"
            )
        names = list(scored[0][1]) if scored else ["rank", *_check_metrics(records, metrics, rank_metric)]
        nuggets = pa.StructArray.from_arrays(
            [pa.array([s[name] for _, s in scored], pa.int64() if name == "rank" else pa.float64()) for name in names],
            names=names,
        )
        table = table.append_column(GOLDEN_FIELD, nuggets)
        table = table.replace_schema_metadata(_golden_metadata(table.schema.metadata, names))
        if kind == "parquet":
            path = _write_parquet(workdir / "golden.parquet", table)
        else:
            path = _write_dataset_dir(workdir / "golden", table)
    for name in GOLDEN_NAMES:
        if workdir / name != path:
            _remove(workdir / name)
    return path


def write_ranking_table(
    workdir: str | os.PathLike[str],
    source: str | os.PathLike[str] | None,
    records: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, np.ndarray],
    rank_metric: str,
) -> pathlib.Path | None:
    """For a Parquet or datasets-directory pool, writes ranking.parquet beside ranking.jsonl.

    Columns: rank (int64), id, every metric (float64, null for a non-finite value), then every
    source column but the example ones (id, instruction, input, output, system, history,
    messages, conversations); one row per candidate, best first, taken with Arrow `take`. A json
    or jsonl pool (or a generated one) gets none, and a ranking.parquet of an earlier run is removed.

    Args:
      workdir: the run's workdir.
      source: the pool file or directory; None for a generated pool.
      records: [C] candidate records; candidate i is row i of `source`.
      metrics: metric name -> [C] values.
      rank_metric: the metric that orders the rows.

    Returns:
      The path written, or None.

    Raises:
      SelectionError: bad metrics, a source column whose name clashes with "rank" or a metric,
        or a source that changed since it was read.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / "ranking.parquet"
    if source is None or data_lib.files.file_kind(source) not in ("parquet", "hf"):
        _remove(path)
        return None
    import pyarrow as pa

    checked = _check_metrics(records, metrics, rank_metric)
    order = rank_order(checked[rank_metric])
    names = data_lib.files.read_schema(source).names
    carried = [name for name in names if name not in _EXAMPLE_FIELDS]
    for name in carried:
        if name in {"rank", *checked}:
            raise SelectionError(
                f"{source}: column {name!r} clashes with a ranking column; rename it in the input file"
            )
    rows = _source_rows(source, records, order.tolist(), columns=["id", *carried])
    ids = [_record_id(records[i], int(i)) for i in order]
    try:
        id_column = pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # ids of mixed types
        id_column = pa.array([str(i) for i in ids])
    columns = {"rank": pa.array(ranks(checked[rank_metric])[order], pa.int64()), "id": id_column}
    for name, values in checked.items():
        columns[name] = pa.array([_json_number(v) for v in values[order]], pa.float64())
    table = pa.table(columns)
    for name in carried:
        table = table.append_column(rows.schema.field(name), rows.column(name))
    return _write_parquet(path, table)


def _source_rows(source, records: Sequence[Mapping[str, Any]], positions: Sequence[int], columns=None):
    """The source rows of these candidates (a pyarrow Table), checked against the records read."""
    table = data_lib.files.read_rows(source, positions, columns=columns)
    if "id" in table.column_names:
        # The records were read from this source at the start of the run; a file replaced since
        # would pair the scores with other rows.
        found = table.column("id").to_pylist()
        for index, row_id in zip(positions, found, strict=True):
            if row_id is not None and row_id != records[index].get("id", row_id):
                raise SelectionError(
                    f"{source}: row {index} has id {row_id!r}, but the scored record {index} was "
                    f"{records[index].get('id')!r}; the file changed during the run, score it again"
                )
    return table


def _golden_metadata(metadata: Mapping[bytes, bytes] | None, names: Sequence[str]) -> dict[bytes, bytes] | None:
    """Schema metadata with the `nuggets` column added to HF `datasets` features, when they are there."""
    if not metadata or b"huggingface" not in metadata:
        return dict(metadata) if metadata else None
    try:
        hf = json.loads(metadata[b"huggingface"])
        features = hf["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return {k: v for k, v in metadata.items() if k != b"huggingface"}
    if isinstance(features, dict):
        hf["info"]["features"] = {**features, GOLDEN_FIELD: _golden_features(names)}
    return {**metadata, b"huggingface": json.dumps(hf).encode()}


def _golden_features(names: Sequence[str]) -> dict[str, Any]:
    """HF `datasets` features of the `nuggets` struct (as `Features.to_dict` writes them)."""
    return {name: {"dtype": "int64" if name == "rank" else "float64", "_type": "Value"} for name in names}


def _write_parquet(path: pathlib.Path, table) -> pathlib.Path:
    import pyarrow.parquet as pq

    with _replacing(path) as tmp_path:
        pq.write_table(table, tmp_path)
    return path


def _write_dataset_dir(path: pathlib.Path, table) -> pathlib.Path:
    """A save_to_disk directory of `table`: one Arrow stream file, state.json, dataset_info.json.

    dataset_info.json's features are those of the schema metadata (the source's, `nuggets` added
    by `_golden_metadata`), which `datasets.load_from_disk` checks against the Arrow schema; without
    them, datasets infers the features from the schema.
    """
    import pyarrow as pa

    data_name = "data-00000-of-00001.arrow"
    tmp_dir = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        with pa.OSFile(str(tmp_dir / data_name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        info = {"citation": "", "description": "", "homepage": "", "license": ""}
        with contextlib.suppress(ValueError, KeyError, TypeError):
            info["features"] = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        state = {
            "_data_files": [{"filename": data_name}],
            "_fingerprint": hashlib.sha256((tmp_dir / data_name).read_bytes()).hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        for name, content in (("dataset_info.json", info), ("state.json", state)):
            (tmp_dir / name).write_text(json.dumps(content, indent=2, sort_keys=name == "state.json") + "\n")
        # Swap in the new directory; a reader sees the old one, briefly none, then the new one.
        old_dir = path.with_name(f".{path.name}.{os.getpid()}.old")
        if path.exists():
            os.replace(path, old_dir)
        os.replace(tmp_dir, path)
        shutil.rmtree(old_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return path


def _remove(path: pathlib.Path) -> None:
    """Removes an output of an earlier run (a file or a directory), if there is one."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
