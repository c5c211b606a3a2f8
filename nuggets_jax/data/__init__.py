"""Records of every form, templates, the token policy and exact token spans.

A record is an Alpaca example (`instruction`, optional `input`, `output`, optional `history`) or
a conversation (`messages`, ShareGPT `conversations`), with an optional `id` (else its 0-based
position); every other field is carried through untouched. A template cuts a record into text
segments that are scored or not; each is tokenized on its own and the pieces concatenated, so
the scored spans are exact. Candidate prefixes and task sequences follow the preset's
special-token policy (docs/ARCHITECTURE.md, "Token spans" and "Chat data").

Modules: `files` (reading and writing record files: json, jsonl, parquet, HF datasets),
`records` (validating the record forms), `templates` (text and chat), `tokens` (the token policy
and tokenization).
"""

from nuggets_jax.data.files import DataError, read_objects
from nuggets_jax.data.records import (
    FORMATS,
    RECORD_COLUMNS,
    ROLES,
    TEMPLATE_FIELDS,
    Record,
    detect_format,
    read_records,
    records_from_objects,
)
from nuggets_jax.data.templates import SCORE_TURNS, TEMPLATES, ChatTemplate, Template, template_of
from nuggets_jax.data.tokens import (
    POLICY_OVERRIDES,
    PRESETS,
    TokenizedPrefixes,
    TokenizedTasks,
    TokenPolicy,
    leading_special_tokens,
    span_masks,
    token_policy,
    tokenize_prefixes,
    tokenize_tasks,
)

__all__ = [
    "FORMATS",
    "RECORD_COLUMNS",
    "ROLES",
    "SCORE_TURNS",
    "TEMPLATES",
    "ChatTemplate",
    "detect_format",
    "template_of",
    "POLICY_OVERRIDES",
    "PRESETS",
    "TEMPLATE_FIELDS",
    "DataError",
    "Record",
    "Template",
    "TokenPolicy",
    "TokenizedPrefixes",
    "TokenizedTasks",
    "leading_special_tokens",
    "span_masks",
    "read_objects",
    "read_records",
    "records_from_objects",
    "token_policy",
    "tokenize_prefixes",
    "tokenize_tasks",
]
