"""Records, templates and exact token spans.

A record is `instruction`, optional `input`, `output`, optional `id` (else its 0-based position);
every other field is carried through untouched. Prompt and response are tokenized separately and
concatenated, so the response span is exact. Candidate prefixes and task sequences follow the
preset's special-token policy (docs/ARCHITECTURE.md, "Token spans").
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax.errors import UserError

TEMPLATE_FIELDS = ("instruction", "input", "output")


class DataError(UserError):
    """Bad input data; the message names the file, the record and the fix."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One instruction example; `raw` is the record exactly as read (extra fields included)."""

    id: str
    instruction: str
    input: str
    output: str
    position: int
    raw: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Template:
    """Prompt templates with `{instruction}` / `{input}`; the response is the stripped output."""

    prompt_no_input: str = "Instruction:\n{instruction}\nResponse:\n"
    prompt_with_input: str = "Instruction:\n{instruction}\nInput:\n{input}\nResponse:\n"

    @classmethod
    def from_config(cls, data_config: Mapping[str, Any]) -> Template:
        """The template of a config's `data` section (`prompt_no_input`, `prompt_with_input`)."""
        return cls(data_config["prompt_no_input"], data_config["prompt_with_input"])

    def prompt(self, record: Record) -> str:
        if record.input:
            return self.prompt_with_input.format(instruction=record.instruction, input=record.input)
        return self.prompt_no_input.format(instruction=record.instruction)

    def full_text(self, record: Record) -> str:
        return self.prompt(record) + record.output


@dataclasses.dataclass(frozen=True)
class TokenPolicy:
    """How sequences are assembled (the preset).

    Attributes:
      separator: text between the candidate and the task ("" = none).
      zero_shot_special: the zero-shot sequence starts with the tokenizer's leading special tokens.
        One-shot always starts with the candidate as the tokenizer encodes it by default.
      max_prefix_tokens: candidate tokens kept (the first ones), None = no cut.
      max_task_tokens: task tokens kept (the first ones); response tokens past the cut are not scored.
    """

    separator: str = "\n\n"
    zero_shot_special: bool = True
    max_prefix_tokens: int | None = 512
    max_task_tokens: int = 512


# The presets (docs/ARCHITECTURE.md, "Token spans"): `default` is TokenPolicy's defaults; `original`
# reproduces the original repository (no separator, zero-shot without special tokens, tasks cut at 200).
PRESETS: dict[str, TokenPolicy] = {
    "default": TokenPolicy(),
    "original": TokenPolicy(separator="", zero_shot_special=False, max_prefix_tokens=None, max_task_tokens=200),
}
POLICY_OVERRIDES = ("separator", "max_prefix_tokens", "max_task_tokens")


def token_policy(preset: str, overrides: Mapping[str, Any] | None = None) -> TokenPolicy:
    """The preset's policy with each override that is not None applied (`data.*` config fields).

    Raises:
      DataError: an unknown preset or a token cut below 1.
    """
    if preset not in PRESETS:
        raise DataError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    changes = {k: overrides.get(k) for k in POLICY_OVERRIDES} if overrides else {}
    policy = dataclasses.replace(PRESETS[preset], **{k: v for k, v in changes.items() if v is not None})
    for key in ("max_prefix_tokens", "max_task_tokens"):
        value = getattr(policy, key)
        if value is not None and value < 1:
            raise DataError(f"data.{key} must be at least 1, got {value}.")
    return policy


@dataclasses.dataclass(frozen=True)
class TokenizedTasks:
    """Task sequences (prompt ++ response ids after the cut) and their scored response spans."""

    ids: list[np.ndarray]  # T x [n_t] int32
    response_start: np.ndarray  # [T] first response token index in ids[t]
    n_tokens: np.ndarray  # [T] scored response tokens (after the cut)
    cut: np.ndarray  # [T] bool: sequence was longer than max_task_tokens


@dataclasses.dataclass(frozen=True)
class TokenizedPrefixes:
    """Prefix ids of each candidate (specials ++ candidate ++ separator) and of the zero-shot run."""

    ids: list[np.ndarray]  # C x [p_c] int32
    cut: np.ndarray  # [C] bool: candidate was longer than max_prefix_tokens
    zero_shot: np.ndarray  # [p_0] the prefix of the zero-shot sequences (often empty)


# -- reading ------------------------------------------------------------------------------------


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


# -- tokenizing ----------------------------------------------------------------------------------


def _encode(tokenizer, texts: Sequence[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=special)["input_ids"]


def leading_special_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of a text by default (e.g. [BOS] or [])."""
    probe = "Instruction"
    with_special = _encode(tokenizer, [probe], True)[0]
    plain = _encode(tokenizer, [probe], False)[0]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def tokenize_tasks(
    tokenizer, records: Sequence[Record], template: Template, policy: TokenPolicy, source: str = "tasks"
) -> TokenizedTasks:
    """Task ids = prompt ids ++ response ids (no special tokens), cut to `policy.max_task_tokens`.

    Raises:
      DataError: if a task has an empty prompt or keeps no response token after the cut.
    """
    prompts = _encode(tokenizer, [template.prompt(r) for r in records], False)
    responses = _encode(tokenizer, [r.output for r in records], False)
    ids, starts, counts, cut = [], [], [], []
    empty = []
    for record, prompt, response in zip(records, prompts, responses, strict=True):
        full = (prompt + response)[: policy.max_task_tokens]
        if not prompt or len(full) <= len(prompt):
            empty.append(record.id)
            continue
        ids.append(np.asarray(full, np.int32))
        starts.append(len(prompt))
        counts.append(len(full) - len(prompt))
        cut.append(len(prompt) + len(response) > policy.max_task_tokens)
    if empty:
        shown = ", ".join(repr(i) for i in empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise DataError(
            f"{source}: {len(empty)} task(s) have no response token left to score after the cut at "
            f"max_task_tokens={policy.max_task_tokens}: ids {shown}. Raise data.max_task_tokens or drop them."
        )
    return TokenizedTasks(ids, np.asarray(starts, np.int32), np.asarray(counts, np.int32), np.asarray(cut, bool))


def tokenize_prefixes(
    tokenizer, records: Sequence[Record], template: Template, policy: TokenPolicy
) -> TokenizedPrefixes:
    """Prefix ids: the candidate's full text as the tokenizer encodes it by default (its leading
    special tokens included), cut to its first `max_prefix_tokens` tokens, then the separator."""
    texts = _encode(tokenizer, [template.full_text(r) for r in records], True)
    sep = _encode(tokenizer, [policy.separator], False)[0] if policy.separator else []
    ids, cut = [], []
    limit = policy.max_prefix_tokens
    for t in texts:
        cut.append(limit is not None and len(t) > limit)
        ids.append(np.asarray((t[:limit] if limit is not None else t) + sep, np.int32))
    zero = leading_special_tokens(tokenizer) if policy.zero_shot_special else []
    return TokenizedPrefixes(ids, np.asarray(cut, bool), np.asarray(zero, np.int32))
