"""The one reader of record files: `.json` (a list) and `.jsonl` (one object a line)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from nuggets_jax.errors import UserError


class DataError(UserError):
    """Bad input data; the message names the file, the record and the fix."""


def read_objects(
    path: str | pathlib.Path, field: str, error: type[UserError] = DataError, what: str = "file"
) -> list[tuple[str, Any]]:
    """(where, object) pairs of a `.json` file (a list) or a `.jsonl` file (one value a line).

    The one reader of JSON record files. `where` is `file:line` (jsonl) or `file[index]` (json),
    for error messages. A file that is neither `.json` nor `.jsonl` is read as jsonl unless it
    starts with `[`. A UTF-8 byte-order mark is skipped.

    Args:
      path: the file.
      field: the config field that names it (said in the message when the file is missing).
      error: the UserError subclass raised (the caller's stage).
      what: what the file is, for the not-found message ("pool file").

    Raises:
      error: naming the file, the line (jsonl) or index (json) and what to fix.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise error(f"{path}: {what} not found{hint}; set {field} to a .json or .jsonl file.")
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
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        objects: list[tuple[str, Any]] = []
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
