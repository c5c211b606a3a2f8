"""Embeddings of examples with the scoring model: the mean of the final hidden layer over real tokens.

Used to build K-means task sets and for diversity-aware golden sets (`select.Diversity`).
Sequences are batched by length bucket with one program per bucket compiled ahead of time;
padding never enters a mean, so an embedding does not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax.errors import UserError
from nuggets_jax.scoring.packing import bucket_of, prefix_buckets

EMBEDDING_TEXTS = ("full", "prompt", "output")
EMBEDDING = "mean of final hidden layer over real tokens"


class EmbeddingError(UserError):
    """Examples or settings that cannot be embedded."""


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    """How examples are embedded.

    Attributes:
      text: "full" (the template's prompt + output, what a candidate prefix holds), "prompt" or "output".
      max_tokens: tokens kept per example (the first ones).
      batch_tokens: target rows x width of one call.
      max_buckets: length buckets (one compiled program each).
    """

    text: str = "full"
    max_tokens: int = 256
    batch_tokens: int = 8192
    max_buckets: int = 6


def embedding_texts(records: Sequence[data_lib.Record], template: data_lib.Template, text: str = "full") -> list[str]:
    """The text of each record that is embedded."""
    if text == "full":
        return [template.full_text(r) for r in records]
    if text == "prompt":
        return [template.prompt(r) for r in records]
    if text == "output":
        return [r.output for r in records]
    raise EmbeddingError(f"unknown embedding text {text!r}; choose one of: {', '.join(EMBEDDING_TEXTS)}.")


def tokenize_for_embedding(tokenizer, texts: Sequence[str], max_tokens: int) -> list[np.ndarray]:
    """Token ids as the tokenizer encodes each text by default (special tokens included), cut."""
    if max_tokens < 1:
        raise EmbeddingError(f"embedding max_tokens must be at least 1, got {max_tokens}.")
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []
    return [np.asarray(t[:max_tokens], np.int32) for t in ids]


def masked_mean(h, mask):
    """Mean of h [B, L, D] over the positions where mask [B, L] is true, in float32 -> [B, D].

    A row with no real token gives zeros (padding rows of a batch), not NaN.
    """
    import jax.numpy as jnp

    weights = mask.astype(jnp.float32)[..., None]  # [B, L, 1]
    total = jnp.sum(h.astype(jnp.float32) * weights, axis=1)  # [B, D]
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def _mean_hidden_program(graphdef, state, tokens, mask):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    return masked_mean(model.hidden(tokens, mask), mask)


@dataclasses.dataclass(frozen=True)
class EmbedStats:
    """What `embed_token_ids` did."""

    wall_s: float
    tokens: int  # real tokens embedded
    padded_tokens: int  # tokens computed, padding included
    programs: int  # compiled programs (one per bucket)
    buckets: tuple[int, ...]


def embed_token_ids(
    model,
    ids: Sequence[np.ndarray],
    batch_tokens: int = 8192,
    max_buckets: int = 6,
) -> tuple[np.ndarray, EmbedStats]:
    """Mean final hidden state over the real tokens of each sequence.

    Sequences are grouped into at most `max_buckets` widths (least padding); each bucket has one
    fixed batch shape compiled ahead of time, so nothing compiles inside the loop. Right padding
    cannot change a real token's hidden state (causal attention masks padded keys) and is left
    out of the mean, so an embedding does not depend on its batch or bucket.

    Args:
      model: a `Llama`.
      ids: N token-id arrays, each non-empty.
      batch_tokens: target rows x width per call.
      max_buckets: number of widths.

    Returns:
      ([N, D] float32 embeddings, stats).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    t0 = time.perf_counter()
    lengths = [len(t) for t in ids]
    if not ids:
        return np.zeros((0, model.config.hidden_size), np.float32), EmbedStats(0.0, 0, 0, 0, ())
    if min(lengths) < 1:
        raise EmbeddingError("cannot embed an empty token sequence.")
    widths = prefix_buckets(lengths, max_buckets)
    members: dict[int, list[int]] = {w: [] for w in widths}
    for i, n in enumerate(lengths):
        members[widths[bucket_of(n, widths)]].append(i)
    graphdef, state = nnx.split(model)
    program = jax.jit(functools.partial(_mean_hidden_program, graphdef))
    out = np.zeros((len(ids), model.config.hidden_size), np.float32)
    pending = []
    padded = 0
    programs = 0
    for width, rows_of in members.items():
        if not rows_of:
            continue
        # Equal batches (the last one not mostly padding): the fewest calls within batch_tokens.
        calls = math.ceil(len(rows_of) / max(1, batch_tokens // width))
        rows = math.ceil(len(rows_of) / calls)
        spec = jax.ShapeDtypeStruct((rows, width), jnp.int32)
        compiled = program.lower(state, spec, jax.ShapeDtypeStruct((rows, width), jnp.bool_)).compile()
        programs += 1
        for start in range(0, len(rows_of), rows):
            batch = rows_of[start : start + rows]
            tokens = np.zeros((rows, width), np.int32)
            mask = np.zeros((rows, width), bool)
            for r, i in enumerate(batch):
                tokens[r, : lengths[i]] = ids[i]
                mask[r, : lengths[i]] = True
            # Dispatch is asynchronous: the host fills the next batch while this one runs.
            pending.append((batch, compiled(state, tokens, mask)))
            padded += rows * width
    for batch, result in pending:
        out[batch] = np.asarray(result)[: len(batch)]
    stats = EmbedStats(time.perf_counter() - t0, int(sum(lengths)), padded, programs, tuple(widths))
    return out, stats


def embed_records(
    model, tokenizer, records: Sequence[data_lib.Record], template, config: EmbeddingConfig = EmbeddingConfig()
) -> tuple[np.ndarray, EmbedStats]:
    """[N, D] embeddings of records under `config`: each record's text (`embedding_texts`), its
    first `max_tokens` tokens (`tokenize_for_embedding`), then `embed_token_ids`."""
    texts = embedding_texts(records, template, config.text)
    ids = tokenize_for_embedding(tokenizer, texts, config.max_tokens)
    return embed_token_ids(model, ids, config.batch_tokens, config.max_buckets)
