"""Records: `instruction`, optional `input`, `output`, optional `id` (else the 0-based position);
every other field is carried through untouched."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

from nuggets_jax.data.files import DataError, read_objects

TEMPLATE_FIELDS = ("instruction", "input", "output")


@dataclasses.dataclass(frozen=True)
class Record:
    """One instruction example; `raw` is the record exactly as read (extra fields included)."""

    id: str
    instruction: str
    input: str
    output: str
    position: int
    raw: dict[str, Any]


def read_records(path: str | pathlib.Path, role: str = "pool") -> list[Record]:
    """Reads a pool or task set from `.json` (a list of objects) or `.jsonl` (one object a line).

    Raises:
      DataError: naming the file, the line (jsonl) or index (json) and what to fix.
    """
    objects = read_objects(path, f"data.{role}", what=f"{role} file")
    return records_from_objects(objects, str(path), role)


def records_from_objects(objects: Sequence[tuple[str, Any]], source: str, role: str = "pool") -> list[Record]:
    """Validates (where, object) pairs into records; `where` locates each one in error messages."""
    if not objects:
        raise DataError(f"{source}: the {role} is empty; it needs at least one record.")
    records = [_parse_record(where, obj, i) for i, (where, obj) in enumerate(objects)]
    seen: dict[str, str] = {}
    for (where, _), record in zip(objects, records, strict=True):
        if record.id in seen:
            raise DataError(
                f"{where}: duplicate id {record.id!r} (first at {seen[record.id]}); ids must be unique within a file."
            )
        seen[record.id] = where
    return records


def _parse_record(where: str, obj: Any, position: int) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with instruction/input/output, got {type(obj).__name__}.")
    for field in ("instruction", "output"):
        if field not in obj:
            raise DataError(f'{where}: field "{field}" is missing.')
        if not isinstance(obj[field], str):
            raise DataError(f'{where}: field "{field}" must be a string, got {type(obj[field]).__name__}.')
    raw_input = obj.get("input")
    if raw_input is not None and not isinstance(raw_input, str):
        raise DataError(f'{where}: field "input" must be a string or absent, got {type(raw_input).__name__}.')
    output = obj["output"].strip()
    if not output:
        raise DataError(f'{where}: field "output" is empty; every record needs a response to score.')
    instruction = obj["instruction"].strip()
    if not instruction:
        raise DataError(f'{where}: field "instruction" is empty.')
    record_id = obj.get("id", position)
    if not isinstance(record_id, str | int) or isinstance(record_id, bool):
        raise DataError(f'{where}: field "id" must be a string or an integer, got {type(record_id).__name__}.')
    return Record(
        id=str(record_id),
        instruction=instruction,
        input=(raw_input or "").strip(),
        output=output,
        position=position,
        raw=obj,
    )
