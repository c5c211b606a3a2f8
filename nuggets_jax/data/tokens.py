"""The token policy (presets) and exact token spans: prompt and response are tokenized
separately and concatenated, so the response span is exact (docs/ARCHITECTURE.md, "Token spans")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax.data.files import DataError
from nuggets_jax.data.records import Record
from nuggets_jax.data.templates import Template


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
