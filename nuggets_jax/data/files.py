"""The one reader of record files: `.json` (a list), `.jsonl` (one object a line), `.parquet`, and
a directory written by HF `datasets` `save_to_disk` (state.json + Arrow IPC stream files).

pyarrow is imported only for Parquet files and datasets directories; `datasets` itself is never
imported: a save_to_disk directory is read as the Arrow stream files its state.json lists.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import pathlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nuggets_jax.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

KINDS = ".json, .jsonl, .parquet or a datasets save_to_disk directory"
HF_STATE = "state.json"  # save_to_disk of a Dataset: lists the Arrow stream files in "_data_files"
HF_DICT = "dataset_dict.json"  # save_to_disk of a DatasetDict: {"splits": [...]}, one Dataset dir each


class DataError(UserError):
    """Bad input data; the message names the file, the record and the fix."""


def file_kind(path: str | pathlib.Path) -> str:
    """How a record file is read: "json", "jsonl", "parquet" or "hf" (a datasets directory).

    A directory is "hf" (reading it checks for state.json or dataset_dict.json). Otherwise the
    suffix decides; a file that is neither `.json`, `.jsonl` nor `.parquet` is jsonl unless its
    first non-blank character (after a UTF-8 byte-order mark) is `[`.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        return "hf"
    if path.suffix in (".json", ".jsonl", ".parquet"):
        return path.suffix[1:]
    if not path.is_file():
        return "jsonl"
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as handle:
        first = True
        while chunk := handle.read(1 << 16):
            text = decoder.decode(chunk)
            if first:
                text, first = text.removeprefix("\ufeff"), False
            if text := text.lstrip():
                return "json" if text.startswith("[") else "jsonl"
    return "jsonl"


def read_objects(
    path: str | pathlib.Path,
    field: str,
    error: type[UserError] = DataError,
    what: str = "file",
    columns: Sequence[str] | None = None,
) -> list[tuple[str, Any]]:
    """(where, object) pairs of a record file: `.json`, `.jsonl`, `.parquet` or a datasets directory.

    The one reader of record files. `where` is `file:line` (jsonl), `file[index]` (json) or
    `file: row i` (Parquet and datasets directories, i 0-based over the whole dataset), for error
    messages. A file that is neither `.json`, `.jsonl` nor `.parquet` is read as jsonl unless it
    starts with `[`. A UTF-8 byte-order mark is skipped. A DatasetDict directory is read when it
    has exactly one split.

    Args:
      path: the file or directory.
      field: the config field that names it (said in the message when the file is missing).
      error: the UserError subclass raised (the caller's stage).
      what: what the file is, for the not-found message ("pool file").
      columns: for Parquet and datasets directories, the columns to read (those the file lacks are
        left out; only these are materialised); None reads every column. JSON objects are always
        returned whole.

    Raises:
      error: naming the file, the line (jsonl), index (json) or row, and what to fix.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise error(f"{path}: {what} not found; set {field} to a {KINDS}.")
    kind = file_kind(path)
    if kind in ("parquet", "hf"):
        objects: list[tuple[str, Any]] = []
        for start, batch in _positioned_batches(path, kind, columns, None, error, field):
            objects.extend((f"{path}: row {start + i}", row) for i, row in enumerate(batch.to_pylist()))
        return objects
    if not path.is_file():
        raise error(f"{path}: {what} not found (it is not a regular file); set {field} to a {KINDS}.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(
            f"{path}:{line}: byte {e.start} is not valid UTF-8 ({data[e.start : e.start + 1]!r}); "
            "re-encode the file as UTF-8."
        ) from None
    text = text.removeprefix("\ufeff")
    if kind == "jsonl":
        objects = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                objects.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise error(
                    f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); "
                    "each line of a .jsonl file must be one JSON object."
                ) from None
        return objects
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(loaded, list):
        raise error(
            f"{path}: expected a JSON list of records, got {type(loaded).__name__}; "
            "wrap the records in [...] or use .jsonl."
        )
    return [(f"{path}[{i}]", obj) for i, obj in enumerate(loaded)]


def digest(path: str | pathlib.Path) -> str:
    """sha256 hex of a record file's bytes; of a datasets directory, over its state.json and then
    every data file it lists, in order (a DatasetDict: those of its one split).

    Raises:
      DataError: the file or directory is missing or not readable.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; point at a {KINDS}.")
    files = [path] if file_kind(path) != "hf" else _hf_files(path, DataError, "the path")
    sha = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                sha.update(chunk)
    return sha.hexdigest()


def read_schema(path: str | pathlib.Path) -> pa.Schema:
    """The Arrow schema (every column, metadata included) of a Parquet file or a datasets directory.

    Raises:
      DataError: the path is not a readable Parquet file or datasets directory.
    """
    path = pathlib.Path(path)
    kind = _table_kind(path)
    pa = _pyarrow(path, DataError)
    files = [path] if kind == "parquet" else _hf_files(path, DataError, "the path")[1:]
    if not files:
        raise DataError(f"{path}: {HF_STATE} lists no data files; save the dataset again with save_to_disk.")
    try:
        if kind == "parquet":
            return pa.parquet.ParquetFile(path).schema_arrow
        with pa.memory_map(str(files[0])) as source:
            return pa.ipc.open_stream(source).schema
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{files[0]}: not readable by pyarrow ({e}); write it again.") from None


def read_rows(
    path: str | pathlib.Path, positions: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None
) -> pa.Table:
    """The rows at `positions` (0-based, in that order) of a Parquet file or a datasets directory.

    Read row group by row group (Parquet; groups holding none of the rows are not read) or batch
    by batch (Arrow streams), with `take`; the rows never become Python objects.

    Args:
      path: a `.parquet` file or a save_to_disk directory.
      positions: [N] row positions; may be in any order and repeat.
      columns: the columns to keep (in the file's order; those the file lacks are left out); None
        keeps every column.

    Returns:
      An N-row table with the file's schema (its metadata included).

    Raises:
      DataError: the path is not a readable Parquet file or datasets directory, or a position is
        out of range.
    """
    path = pathlib.Path(path)
    kind = _table_kind(path)
    pa = _pyarrow(path, DataError)
    wanted = np.asarray(positions, dtype=np.int64).reshape(-1)
    order = np.argsort(wanted, kind="stable")
    ascending = wanted[order]  # [N]
    if ascending.size and ascending[0] < 0:
        raise DataError(f"{path}: row {int(ascending[0])} does not exist; rows are numbered from 0.")
    schema = read_schema(path)
    if columns is not None:
        keep = set(columns)
        schema = pa.schema([f for f in schema if f.name in keep], metadata=schema.metadata)
    pieces, total = [], 0
    for start, batch in _positioned_batches(path, kind, schema.names, ascending):
        lo, hi = np.searchsorted(ascending, [start, start + batch.num_rows])
        if hi > lo:
            piece = batch.take(pa.array(ascending[lo:hi] - start))
            pieces.append(piece.replace_schema_metadata(schema.metadata))
        total = start + batch.num_rows
    total = max(total, _num_rows(path, kind))
    if ascending.size and ascending[-1] >= total:
        raise DataError(f"{path}: row {int(ascending[-1])} does not exist; it has {total} rows.")
    table = pa.Table.from_batches(pieces, schema=schema) if pieces else schema.empty_table()
    return table.take(pa.array(np.argsort(order, kind="stable")))


def _pyarrow(path: pathlib.Path, error: type[UserError]):
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401  (makes pa.parquet available)
    except ImportError:
        raise error(
            f"{path}: reading Parquet files and datasets directories needs pyarrow; pip install pyarrow."
        ) from None
    return pa


def _table_kind(path: pathlib.Path) -> str:
    kind = file_kind(path)
    if kind not in ("parquet", "hf") or not path.exists():
        raise DataError(f"{path}: not a .parquet file or a datasets save_to_disk directory.")
    return kind


def _hf_dataset_dir(path: pathlib.Path, error: type[UserError], field: str) -> pathlib.Path:
    """The Dataset directory of a save_to_disk directory: itself, or a DatasetDict's one split."""
    if (path / HF_STATE).is_file():
        return path
    if not (path / HF_DICT).is_file():
        raise error(
            f"{path}: a directory without {HF_STATE} or {HF_DICT}, so not a datasets save_to_disk directory; "
            f"set {field} to a {KINDS}."
        )
    splits = _json_file(path / HF_DICT, error).get("splits")
    if not isinstance(splits, list) or not splits:
        raise error(f"{path / HF_DICT}: has no list of splits; save the DatasetDict again with save_to_disk.")
    if len(splits) > 1:
        raise error(
            f"{path}: a DatasetDict with {len(splits)} splits ({', '.join(map(str, splits))}); "
            f"set {field} to one of them, {path}/<split> (e.g. {path / str(splits[0])})."
        )
    split = path / str(splits[0])
    if not (split / HF_STATE).is_file():
        raise error(f"{split}: the DatasetDict's split has no {HF_STATE}; save the DatasetDict again.")
    return split


def _hf_files(path: pathlib.Path, error: type[UserError], field: str) -> list[pathlib.Path]:
    """[state.json, data files...] of a save_to_disk directory, in state.json's order."""
    directory = _hf_dataset_dir(path, error, field)
    state = _json_file(directory / HF_STATE, error)
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e for e in entries):
        raise error(f'{directory / HF_STATE}: no "_data_files" list; save the dataset again with save_to_disk.')
    files = [directory / str(e["filename"]) for e in entries]
    for file in files:
        if not file.is_file():
            raise error(f"{file}: listed in {directory / HF_STATE} but missing; copy the whole dataset directory.")
    return [directory / HF_STATE, *files]


def _json_file(path: pathlib.Path, error: type[UserError]) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); save the dataset again with save_to_disk.") from None
    if not isinstance(loaded, dict):
        raise error(f"{path}: expected a JSON object, got {type(loaded).__name__}; save the dataset again.")
    return loaded


def _positioned_batches(
    path: pathlib.Path,
    kind: str,
    columns: Sequence[str] | None,
    needed: np.ndarray | None,
    error: type[UserError] = DataError,
    field: str = "the path",
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row, batch) of a Parquet file (row-group batches) or a datasets directory's Arrow
    streams, with only `columns` (those present, in the file's order; None: all).

    `needed`: [N] ascending row positions, or None for every row; Parquet row groups holding none
    of them are not read.
    """
    pa = _pyarrow(path, error)
    files = [path] if kind == "parquet" else _hf_files(path, error, field)[1:]
    name = "Parquet file" if kind == "parquet" else "Arrow stream file of a datasets directory"
    start = 0
    for file in files:
        try:
            if kind == "parquet":
                parquet = pa.parquet.ParquetFile(file)
                present = _present(parquet.schema_arrow, columns)
                for group in range(parquet.metadata.num_row_groups):
                    rows = parquet.metadata.row_group(group).num_rows
                    lo, hi = np.searchsorted(needed, [start, start + rows]) if needed is not None else (0, 1)
                    if hi > lo:
                        for batch in parquet.iter_batches(row_groups=[group], columns=present):
                            yield start, batch
                            start += batch.num_rows
                    else:
                        start += rows
                continue
            with pa.memory_map(str(file)) as source:
                reader = pa.ipc.open_stream(source)
                present = _present(reader.schema, columns)
                for batch in reader:
                    yield start, (batch if present is None else batch.select(present))
                    start += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise error(f"{file}: not a readable {name} ({e}); write it again or convert it to .jsonl.") from None


def _num_rows(path: pathlib.Path, kind: str) -> int:
    """Rows of a Parquet file from its footer (0 for a datasets directory: its batches were all counted)."""
    if kind != "parquet":
        return 0
    pa = _pyarrow(path, DataError)
    return pa.parquet.ParquetFile(path).metadata.num_rows


def _present(schema, columns: Sequence[str] | None) -> list[str] | None:
    if columns is None:
        return None
    wanted = set(columns)
    return [name for name in schema.names if name in wanted]
