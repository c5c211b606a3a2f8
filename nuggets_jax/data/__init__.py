"""Records of every format, templates, the token policy and exact token spans.

A record is `instruction`, optional `input`, `output`, optional `id` (else its 0-based position);
every other field is carried through untouched. Prompt and response are tokenized separately and
concatenated, so the response span is exact. Candidate prefixes and task sequences follow the
preset's special-token policy (docs/ARCHITECTURE.md, "Token spans").

Modules: `files` (reading record files), `records` (validating them), `templates` (text),
`tokens` (the token policy and tokenization).
"""

from nuggets_jax.data.files import DataError, read_objects
from nuggets_jax.data.records import TEMPLATE_FIELDS, Record, read_records, records_from_objects
from nuggets_jax.data.templates import Template
from nuggets_jax.data.tokens import (
    POLICY_OVERRIDES,
    PRESETS,
    TokenizedPrefixes,
    TokenizedTasks,
    TokenPolicy,
    leading_special_tokens,
    token_policy,
    tokenize_prefixes,
    tokenize_tasks,
)

__all__ = [
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
    "read_objects",
    "read_records",
    "records_from_objects",
    "token_policy",
    "tokenize_prefixes",
    "tokenize_tasks",
]
