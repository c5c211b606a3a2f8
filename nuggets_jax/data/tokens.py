"""The token policy (presets) and exact token spans: prompt and response are tokenized
separately and concatenated, so the response span is exact (docs/ARCHITECTURE.md, "Token spans")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax.data.files import DataError
from nuggets_jax.data.records import Record
from nuggets_jax.data.templates import SCORE_TURNS, TEMPLATES, ChatTemplate, Template


@dataclasses.dataclass(frozen=True)
class TokenPolicy:
    """How sequences are assembled (the preset).

    Attributes:
      separator: text between the candidate and the task ("" = none).
      zero_shot_special: the zero-shot sequence starts with the tokenizer's leading special tokens.
        One-shot always starts with the candidate as the tokenizer encodes it by default.
      max_prefix_tokens: candidate tokens kept (the first ones), None = no cut.
      max_task_tokens: task tokens kept (the first ones); response tokens past the cut are not scored.
      score_turns: "all" assistant turns of a task are scored, or only the "last" (chat template).
    """

    separator: str = "\n\n"
    zero_shot_special: bool = True
    max_prefix_tokens: int | None = 512
    max_task_tokens: int = 512
    score_turns: str = "all"


# The presets (docs/ARCHITECTURE.md, "Token spans"): `default` is TokenPolicy's defaults; `original`
# reproduces the original repository (no separator, zero-shot without special tokens, tasks cut at 200).
PRESETS: dict[str, TokenPolicy] = {
    "default": TokenPolicy(),
    "original": TokenPolicy(separator="", zero_shot_special=False, max_prefix_tokens=None, max_task_tokens=200),
}
POLICY_OVERRIDES = ("separator", "max_prefix_tokens", "max_task_tokens", "score_turns")


def token_policy(preset: str, overrides: Mapping[str, Any] | None = None) -> TokenPolicy:
    """The preset's policy with each override that is not None applied (`data.*` config fields).

    Under `data.template=chat` the template writes every special token and the two conversations
    follow each other directly: no separator, no leading special tokens.

    Raises:
      DataError: an unknown preset, template or score_turns, a token cut below 1, or a separator
        set with the chat template.
    """
    if preset not in PRESETS:
        raise DataError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    changes = {k: overrides.get(k) for k in POLICY_OVERRIDES} if overrides else {}
    policy = dataclasses.replace(PRESETS[preset], **{k: v for k, v in changes.items() if v is not None})
    template = (overrides.get("template") if overrides else None) or "text"
    if template not in TEMPLATES:
        raise DataError(f"unknown data.template {template!r}; choose one of: {', '.join(TEMPLATES)}.")
    if policy.score_turns not in SCORE_TURNS:
        raise DataError(f"unknown data.score_turns {policy.score_turns!r}; choose one of: {', '.join(SCORE_TURNS)}.")
    if template == "chat":
        if preset == "original":
            raise DataError("preset=original is the paper's text template; use data.template=text with it.")
        if changes.get("separator"):
            raise DataError(
                "data.separator is for the text template; under data.template=chat the candidate's "
                "conversation is followed directly by the task's. Leave data.separator unset."
            )
        policy = dataclasses.replace(policy, separator="", zero_shot_special=False)
    for key in ("max_prefix_tokens", "max_task_tokens"):
        value = getattr(policy, key)
        if value is not None and value < 1:
            raise DataError(f"data.{key} must be at least 1, got {value}.")
    return policy


@dataclasses.dataclass(frozen=True)
class TokenizedTasks:
    """Task sequences (segment ids after the cut) and which of their tokens are scored."""

    ids: list[np.ndarray]  # T x [n_t] int32
    response_start: np.ndarray  # [T] first scored token index in ids[t]
    n_tokens: np.ndarray  # [T] scored tokens (after the cut)
    cut: np.ndarray  # [T] bool: sequence was longer than max_task_tokens
    scored: list[np.ndarray] | None = None  # T x [n_t] bool: token p is scored (None: from response_start on)

    def scored_masks(self) -> list[np.ndarray]:
        """T x [n_t] bool: which tokens are scored (a response is one span from response_start)."""
        return self.scored if self.scored is not None else span_masks(self.ids, self.response_start)


def span_masks(ids: Sequence[np.ndarray], starts: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """Per sequence a bool mask of one scored span, from its start to the end."""
    return [np.arange(len(seq)) >= int(start) for seq, start in zip(ids, starts, strict=True)]


@dataclasses.dataclass(frozen=True)
class TokenizedPrefixes:
    """Prefix ids of each candidate (specials ++ candidate ++ separator) and of the zero-shot run."""

    ids: list[np.ndarray]  # C x [p_c] int32
    cut: np.ndarray  # [C] bool: candidate was longer than max_prefix_tokens
    zero_shot: np.ndarray  # [p_0] the prefix of the zero-shot sequences (often empty)


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


def _segment_tokens(tokenizer, template: Template, records: Sequence[Record], last_only: bool, source: str):
    """Each record's ids and scored mask: every segment tokenized on its own, no special tokens."""
    try:
        segments = [template.segments(r, last_only) for r in records]
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    encoded = iter(_encode(tokenizer, [text for segs in segments for text, _ in segs], False))
    out = []
    for segs in segments:
        ids: list[int] = []
        scored: list[bool] = []
        for _, is_scored in segs:
            piece = next(encoded)
            ids += piece
            scored += [is_scored] * len(piece)
        out.append((ids, scored))
    return out


def tokenize_tasks(
    tokenizer,
    records: Sequence[Record],
    template: Template | ChatTemplate,
    policy: TokenPolicy,
    source: str = "tasks",
    unscorable: list[str] | None = None,
) -> TokenizedTasks:
    """Task ids = the template's segments tokenized one by one (no special tokens) and
    concatenated, cut to `policy.max_task_tokens`; the scored segments' tokens are scored.

    `unscorable`: None = a task with no text before its first scored token, or no scored token
    left after the cut, is an error; a list = such tasks are left out and their ids appended.

    Raises:
      DataError: for such a task when `unscorable` is None, or when every task is one.
    """
    ids, masks, starts, counts, cut = [], [], [], [], []
    empty = []
    for record, (full, scored) in zip(
        records, _segment_tokens(tokenizer, template, records, policy.score_turns == "last", source), strict=True
    ):
        mask = np.asarray(scored[: policy.max_task_tokens], bool)
        if not mask.any() or mask[0]:
            empty.append(record.id)
            continue
        ids.append(np.asarray(full[: policy.max_task_tokens], np.int32))
        masks.append(mask)
        starts.append(int(np.argmax(mask)))
        counts.append(int(mask.sum()))
        cut.append(len(full) > policy.max_task_tokens)
    if unscorable is not None and len(empty) < len(records):
        unscorable += empty
    elif empty:
        shown = ", ".join(repr(i) for i in empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise DataError(
            f"{source}: {len(empty)} task(s) have no response token left to score after the cut at "
            f"max_task_tokens={policy.max_task_tokens} (or no prompt before it): ids {shown}. "
            "Raise data.max_task_tokens or drop them."
        )
    return TokenizedTasks(ids, np.asarray(starts, np.int32), np.asarray(counts, np.int32), np.asarray(cut, bool), masks)


def tokenize_prefixes(
    tokenizer, records: Sequence[Record], template: Template | ChatTemplate, policy: TokenPolicy, source: str = "pool"
) -> TokenizedPrefixes:
    """Prefix ids: under the text template the candidate's full text as the tokenizer encodes it
    by default (its leading special tokens included), under the chat template its segments
    tokenized one by one (the template writes the special tokens); cut to the first
    `max_prefix_tokens` tokens, then the separator."""
    if isinstance(template, ChatTemplate):
        texts = [ids for ids, _ in _segment_tokens(tokenizer, template, records, False, source)]
    else:
        texts = _encode(tokenizer, [template.full_text(r) for r in records], True)
    sep = _encode(tokenizer, [policy.separator], False)[0] if policy.separator else []
    ids, cut = [], []
    limit = policy.max_prefix_tokens
    for t in texts:
        cut.append(limit is not None and len(t) > limit)
        ids.append(np.asarray((t[:limit] if limit is not None else t) + sep, np.int32))
    zero = leading_special_tokens(tokenizer) if policy.zero_shot_special else []
    return TokenizedPrefixes(ids, np.asarray(cut, bool), np.asarray(zero, np.int32))
