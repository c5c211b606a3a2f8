"""Records: one instruction example or conversation, in any of the accepted forms.

Forms (`data.format`, or detected per file from the first record's keys):
- `alpaca`: `instruction`, optional `input`, `output`; optional `system` and `history` (earlier
  [user, assistant] turns, LLaMA-Factory).
- `messages`: `[{role, content}]` with roles system/user/assistant (OpenAI / TRL); a content may be
  a list of parts, whose `text` parts are joined.
- `sharegpt`: `conversations: [{from, value}]` with from human/gpt/system (user/assistant too).

Every record has `messages`, its conversation as (role, content) pairs: under the chat template it
is what is rendered; an Alpaca record's is [user: instruction + "\\n\\n" + input, assistant: output]
after its history. `id` is the record's `id` field, else its 0-based position; every other field
is carried through untouched.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

from nuggets_jax.data.files import DataError, read_objects

TEMPLATE_FIELDS = ("instruction", "input", "output")
FORMATS = ("auto", "alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant")
# The columns a reader keeps of a table (parquet, HF datasets): the example itself; the rest
# is read back for the selected rows only.
RECORD_COLUMNS = ("id", "instruction", "input", "output", "system", "history", "messages", "conversations")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_FORMAT_KEY = {"messages": "messages", "sharegpt": "conversations"}


@dataclasses.dataclass(frozen=True)
class Record:
    """One example; `raw` is the record exactly as read (extra fields included).

    Attributes:
      id: the `id` field as a string, else the position.
      instruction, input, output: the Alpaca fields, stripped. A conversation's instruction is its
        first user turn and its output its last assistant turn (what reports show).
      position: 0-based position in its file.
      raw: the record as read.
      messages: the conversation as (role, content) pairs.
      format: "alpaca", "messages" or "sharegpt".
    """

    id: str
    instruction: str
    input: str
    output: str
    position: int
    raw: dict[str, Any]
    messages: tuple[tuple[str, str], ...] = ()
    format: str = "alpaca"

    @property
    def is_conversation(self) -> bool:
        """A `messages` or ShareGPT record, or an Alpaca record with a history or system prompt."""
        return self.format != "alpaca" or len(self.messages) > 2 or self.messages[0][0] != "user"


class EmptyResponseError(DataError):
    """A record whose response (or one of its assistant turns) is empty: nothing to score."""


def read_records(
    path: str | pathlib.Path, role: str = "pool", form: str = "auto", skipped: list[str] | None = None
) -> list[Record]:
    """Reads a pool or task set: `.json`, `.jsonl`, `.parquet` or an HF `save_to_disk` directory
    (`skipped` as in `records_from_objects`).

    Raises:
      DataError: naming the file, the record and what to fix.
    """
    objects = read_objects(path, f"data.{role}", what=f"{role} file", columns=RECORD_COLUMNS)
    return records_from_objects(objects, str(path), role, form, skipped)


def detect_format(obj: Any, form: str = "auto") -> str:
    """The record form of a file from its first record (`form` when it is not "auto")."""
    if form not in FORMATS:
        raise DataError(f"unknown data.format {form!r}; choose one of: {', '.join(FORMATS)}.")
    if form != "auto" or not isinstance(obj, dict):
        return "alpaca" if form == "auto" else form
    if obj.get("messages") is not None:
        return "messages"
    if obj.get("conversations") is not None:
        return "sharegpt"
    return "alpaca"


def records_from_objects(
    objects: Sequence[tuple[str, Any]],
    source: str,
    role: str = "pool",
    form: str = "auto",
    skipped: list[str] | None = None,
) -> list[Record]:
    """Validates (where, object) pairs into records; `where` locates each one in error messages.

    Args:
      objects: (where, object) pairs, e.g. from `read_objects`.
      source: the file, for messages about the whole file.
      role: "pool", "tasks", ... (said in messages).
      form: a record form, or "auto" to detect it from the first record.
      skipped: None = an empty response is an error; a list = such records are left out (their
        positions and ids stay those of the file) and their `where` appended to it.
    """
    if not objects:
        raise DataError(f"{source}: the {role} is empty; it needs at least one record.")
    form = detect_format(objects[0][1], form)
    records, kept = [], []
    for i, (where, obj) in enumerate(objects):
        try:
            records.append(_parse_record(where, obj, i, form))
        except EmptyResponseError:
            if skipped is None:
                raise
            skipped.append(where)
            continue
        kept.append(where)
    if not records:
        raise DataError(f"{source}: every record of the {role} has an empty response; there is nothing to score.")
    seen: dict[str, str] = {}
    for where, record in zip(kept, records, strict=True):
        if record.id in seen:
            raise DataError(
                f"{where}: duplicate id {record.id!r} (first at {seen[record.id]}); ids must be unique within a file."
            )
        seen[record.id] = where
    return records


def _parse_record(where: str, obj: Any, position: int, form: str = "alpaca") -> Record:
    if not isinstance(obj, dict):
        what = "instruction/input/output" if form == "alpaca" else repr(_FORMAT_KEY[form])
        raise DataError(f"{where}: expected an object with {what}, got {type(obj).__name__}.")
    record_id = obj.get("id")
    record_id = position if record_id is None else record_id
    if not isinstance(record_id, str | int) or isinstance(record_id, bool):
        raise DataError(f'{where}: field "id" must be a string or an integer, got {type(record_id).__name__}.')
    if form == "alpaca":
        return _parse_alpaca(where, obj, position, str(record_id))
    messages = _parse_messages(where, obj, form)
    first_user = next((c for r, c in messages if r == "user"), "")
    last_assistant = next((c for r, c in reversed(messages) if r == "assistant"), "")
    return Record(str(record_id), first_user.strip(), "", last_assistant.strip(), position, obj, messages, form)


def _parse_alpaca(where: str, obj: dict[str, Any], position: int, record_id: str) -> Record:
    for field in ("instruction", "output"):
        if field not in obj:
            hint = ""
            if "messages" in obj or "conversations" in obj:
                hint = " (this record is a conversation but the file's first record is Alpaca; set data.format)"
            raise DataError(f'{where}: field "{field}" is missing{hint}.')
        if not isinstance(obj[field], str):
            raise DataError(f'{where}: field "{field}" must be a string, got {type(obj[field]).__name__}.')
    for field in ("input", "system"):
        value = obj.get(field)
        if value is not None and not isinstance(value, str):
            raise DataError(f'{where}: field "{field}" must be a string or absent, got {type(value).__name__}.')
    output = obj["output"].strip()
    if not output:
        raise EmptyResponseError(
            f'{where}: field "output" is empty; every record needs a response to score '
            "(fill it or drop the record; data.skip_empty=True leaves such records out)."
        )
    instruction = obj["instruction"].strip()
    if not instruction:
        raise DataError(f'{where}: field "instruction" is empty.')
    text_input = (obj.get("input") or "").strip()
    messages: list[tuple[str, str]] = []
    system = (obj.get("system") or "").strip()
    if system:
        messages.append(("system", system))
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise DataError(f'{where}: field "history" must be a list of [user, assistant] pairs.')
    for turn, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise DataError(f"{where}: history[{turn}] must be a [user, assistant] pair of strings.")
        if not pair[1].strip():
            raise EmptyResponseError(f"{where}: history[{turn}] has an empty assistant turn; fill it or drop the pair.")
        messages += [("user", pair[0].strip()), ("assistant", pair[1].strip())]
    messages += [("user", instruction + (f"\n\n{text_input}" if text_input else "")), ("assistant", output)]
    return Record(record_id, instruction, text_input, output, position, obj, tuple(messages), "alpaca")


def _content(where: str, turn: int, content: Any) -> str:
    """A message content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                text = part.get("text", part.get("value"))
                if not isinstance(text, str):
                    raise DataError(f'{where}: message {turn}: a text part needs a string "text".')
                texts.append(text)
        return "".join(texts)
    raise DataError(
        f"{where}: message {turn}: content must be a string or a list of parts, got {type(content).__name__}."
    )


def _parse_messages(where: str, obj: dict[str, Any], form: str) -> tuple[tuple[str, str], ...]:
    key = _FORMAT_KEY[form]
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        other = "conversations" if key == "messages" else "messages"
        hint = f' (it has "{other}": set data.format or keep one form per file)' if other in obj else ""
        raise DataError(f'{where}: field "{key}" must be a non-empty list of messages{hint}.')
    role_key, content_key = ("role", "content") if form == "messages" else ("from", "value")
    messages = []
    for turn, message in enumerate(turns):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise DataError(f'{where}: message {turn} must be an object with "{role_key}" and "{content_key}".')
        raw_role = message[role_key]
        role = raw_role if form == "messages" else _SHAREGPT_ROLES.get(raw_role)
        if role not in ROLES:
            known = ", ".join(ROLES if form == "messages" else _SHAREGPT_ROLES)
            raise DataError(
                f"{where}: message {turn} has unknown {role_key} {raw_role!r}; use one of {known} "
                "(map or drop tool and function turns before scoring)."
            )
        content = _content(where, turn, message[content_key])
        if role == "assistant" and not content.strip():
            parts = message[content_key] if isinstance(message[content_key], list) else []
            others = sorted({str(p.get("type")) for p in parts if isinstance(p, dict) and p.get("type") != "text"})
            kept = f" (only text parts are scored; it holds {', '.join(others)})" if others else ""
            raise EmptyResponseError(
                f"{where}: message {turn} is an empty assistant turn{kept}; fill it or drop the turn."
            )
        messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        raise DataError(f"{where}: the conversation has no assistant turn; it needs a response to score.")
    return tuple(messages)
