"""The source of task candidates: the examples task sets are drawn from, read and filtered.

A source is a .json/.jsonl file of examples (records that cannot be tasks, such as an empty
output, are skipped with a message) or the generated held-out tasks ("default"). Examples that
must not be drawn, e.g. the candidate pool a sweep scores, are excluded by content (instruction,
input, output), since ids and extra fields differ between files. Further restrictions (`restrict`,
e.g. prompts that fit the scoring job's task cut) narrow the eligible examples; the file digest,
the exclusion and every restriction go into the provenance of each task set drawn from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import synthetic
from nuggets_jax.errors import UserError

DEFAULT_SOURCE_SIZE = 1000  # records of the generated source ("default"): enough for M = 1000


class TaskSetError(UserError):
    """A task-set request that cannot be built; the message says what to change."""


def content_key(record: data_lib.Record) -> tuple:
    """What makes two records the same example (ids and extra fields differ between files): the
    Alpaca fields, or a conversation's turns."""
    if record.is_conversation:
        return record.messages
    return (record.instruction, record.input, record.output)


def file_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def read_valid_records(
    path: str | pathlib.Path, role: str = "pool", field: str | None = None
) -> tuple[list[data_lib.Record], list[str]]:
    """Reads a .json/.jsonl file like `data.read_records`, but skips records that are not valid.

    Public datasets hold the odd record with an empty output; such a record can be neither a task
    nor a candidate, so sampling skips it instead of refusing the file. A skipped record keeps its
    place: ids of records without an "id" field are still their position in the file.

    Args:
      path: the file.
      role: what the records are ("pool", "taskset.source"), said in messages.
      field: the config field that names the file (default `data.<role>`).

    Returns:
      (valid records, one message per skipped record).

    Raises:
      DataError: the file itself cannot be read (missing, not UTF-8, not JSON), no record is valid,
        or duplicate ids.
    """
    path = pathlib.Path(path)
    objects = data_lib.read_objects(path, field or f"data.{role}")
    valid, wheres, skipped = [], [], []
    for position, (where, obj) in enumerate(objects):
        try:
            (record,) = data_lib.records_from_objects([(where, obj)], str(path), role)
        except data_lib.DataError as e:
            skipped.append(str(e))
            continue
        record_id = record.id if isinstance(obj, dict) and "id" in obj else str(position)
        valid.append(dataclasses.replace(record, id=record_id, position=position))
        wheres.append(where)
    if not valid:
        raise data_lib.DataError(f"{path}: no valid record ({skipped[0] if skipped else f'the {role} is empty'}).")
    seen: dict[str, str] = {}
    for where, record in zip(wheres, valid, strict=True):
        if record.id in seen:
            raise data_lib.DataError(
                f"{where}: duplicate id {record.id!r} (first at {seen[record.id]}); ids must be unique within a file."
            )
        seen[record.id] = where
    return valid, skipped


@dataclasses.dataclass(frozen=True)
class Source:
    """The examples task sets are drawn from.

    Attributes:
      records: every record of the source file.
      path: the file (or a description of the generated source).
      sha256: digest of the file bytes (of the JSON of a generated source).
      eligible: [E] sorted indices into `records` that may be drawn (not excluded).
      exclude: {"path", "sha256", "removed"} of the exclusion, or None.
      filters: descriptions of further restrictions of `eligible` (see `restrict`).
    """

    records: list[data_lib.Record]
    path: str
    sha256: str
    eligible: np.ndarray
    exclude: dict[str, Any] | None = None
    filters: tuple[str, ...] = ()


def restrict(source: Source, keep: np.ndarray, description: str) -> Source:
    """The source with only the eligible records where `keep` [E] is true; `description` goes
    into the provenance of every task set drawn from it."""
    keep = np.asarray(keep, bool)
    if keep.shape != source.eligible.shape:
        raise ValueError(f"keep has shape {keep.shape}, expected one entry per eligible record {source.eligible.shape}")
    if not keep.any():
        raise TaskSetError(f"{source.path}: no record is left after: {description}.")
    removed = int((~keep).sum())
    return dataclasses.replace(
        source, eligible=source.eligible[keep], filters=(*source.filters, f"{description} (removed {removed})")
    )


def load_tokenizer(model_path: str):
    """The tokenizer of a model (see `models.resolve_model_dir`), without loading its weights."""
    import transformers

    from nuggets_jax import models

    return transformers.AutoTokenizer.from_pretrained(str(models.resolve_model_dir(model_path)))


def prompt_fits(
    tokenizer, records: Sequence[data_lib.Record], template: data_lib.Template, max_task_tokens: int
) -> np.ndarray:
    """[N] bool: the record's prompt leaves at least one response token within `max_task_tokens`.

    A task whose prompt alone fills the cut has nothing to score, so the scoring job would refuse it.
    """
    prompts = tokenizer([template.prompt(r) for r in records], add_special_tokens=False)["input_ids"]
    return np.asarray([len(p) < max_task_tokens for p in prompts], bool)


def load_source(
    spec: str,
    exclude: str | pathlib.Path | Sequence[data_lib.Record] | None = None,
    exclude_label: str | None = None,
    log: Callable[[str], None] = print,
) -> Source:
    """Reads the source of task candidates and removes the excluded examples.

    Args:
      spec: a .json/.jsonl file, or "default" for `DEFAULT_SOURCE_SIZE` generated held-out tasks
        (`nuggets_jax.synthetic.generate_tasks`, which never share a question with a generated pool).
      exclude: records (or a file of them) that must not be drawn, matched by content
        (instruction, input, output), e.g. the candidate pool a sweep scores; None or "" = none.
      exclude_label: how the provenance names `exclude` when it is a list of records.
      log: where to say how many invalid records were skipped.

    Raises:
      DataError / TaskSetError: unreadable files, or nothing left to draw from.
    """
    if spec == "default":
        objects = synthetic.generate_tasks(DEFAULT_SOURCE_SIZE)
        path = f"<generated tasks: nuggets_jax.synthetic.generate_tasks({DEFAULT_SOURCE_SIZE})>"
        records = data_lib.records_from_objects([(f"{path}[{i}]", o) for i, o in enumerate(objects)], path, "tasks")
        digest = hashlib.sha256(json.dumps(objects, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    else:
        file = pathlib.Path(spec).expanduser()
        records, skipped = read_valid_records(file, "taskset.source", "taskset.source")
        path, digest = str(file), file_sha256(file)
        if skipped:
            log(f"{path}: skipped {len(skipped)} record(s) that cannot be tasks, e.g. {skipped[0]}")
    eligible = np.arange(len(records))
    info = None
    if exclude is not None and not (isinstance(exclude, str) and not exclude):
        if isinstance(exclude, str | pathlib.Path):
            file = pathlib.Path(exclude).expanduser()
            excluded = data_lib.read_records(file, "taskset.exclude")
            label, excluded_digest = str(file), file_sha256(file)
        else:
            excluded = list(exclude)
            label = exclude_label or "<records>"
            keys = sorted(content_key(r) for r in excluded)
            excluded_digest = hashlib.sha256(json.dumps(keys, ensure_ascii=False).encode()).hexdigest()
        banned = {content_key(r) for r in excluded}
        eligible = np.asarray([i for i, r in enumerate(records) if content_key(r) not in banned], np.int64)
        info = {"path": label, "sha256": excluded_digest, "removed": int(len(records) - len(eligible))}
    if len(eligible) == 0:
        raise TaskSetError(f"{path}: every record is excluded ({info}); draw task sets from another source.")
    return Source(records, path, digest, eligible, info)
