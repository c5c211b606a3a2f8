"""The attention kernels of prefix-cached scoring: softmax over a cached prefix and packed task rows.

A scored token attends to two key sets: its candidate's prefix (cached by `Llama.encode_prefix`,
one per candidate, shared by every row) and the earlier tokens of its own task in its row. Both
are computed as a `_partial_attention` (the unnormalised value sum with its running peak and
denominator) and `_merge_partials` combines them into the softmax over the union, so the prefix
is broadcast inside the einsum and never copied per row. Scores, softmax and value sums are in
float32; masked scores get a large finite value so that a fully masked (padding) query stays
finite instead of NaN.

The row part comes in two layouts:

- `masked_attention`: one masked [L, L] block per row (segment ids keep packed tasks apart);
  also the plain causal attention of whole sequences (`Llama.hidden`, `Llama.encode_prefix`).
- `task_window_attention` (`TaskWindows`, laid out by `scoring.packing.add_task_windows`): every
  task attends inside a window of its own, so no cross-task score is computed and the work does
  not grow with the row length. Inside a window the queries run in causal blocks of about
  `attention_block` (the scores above the diagonal of later blocks are skipped), and with
  `attention_queries` a loop runs a few windows / row tokens per step so each step's scores stay
  in cache (the CPU setting; accelerators run everything at once).

Shape letters as in `llama.py`: C candidates, R rows, L row tokens, P prefix tokens, K kv heads,
G query heads per kv head, Dh head dim; W window width, M keys of one partial.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so fully masked (padding) rows stay finite instead of NaN.


class TaskWindows(NamedTuple):
    """Where attention runs for packed rows: every task in a window of its own (`packing.add_task_windows`).

    A window holds a task's tokens from its first one on, so causal attention inside the window
    is exactly the task's own attention, whatever the window's tail holds.
    """

    index: tuple[jax.Array, ...]  # per width W: [n_W, W] or [C, n_W, W] flat row-token index of each window
    back: jax.Array  # [R * L] or [C, R * L]: each row token's place in the concatenated windows
    attention_queries: int = 0  # queries per attention step, windows and prefix (a loop keeps them in cache); 0 = all
    attention_block: int = 0  # queries per causal block inside a window (skips the upper triangle); 0 = whole


def masked_attention(
    q: jax.Array,  # [C, R, L, K, G, Dh]
    k: jax.Array,  # [C, R, L, K, Dh]
    v: jax.Array,  # [C, R, L, K, Dh]
    row_mask: jax.Array,  # bool, broadcastable to [C, R, L(query), L(key)]
    prefix: tuple[jax.Array, jax.Array, jax.Array] | None,  # k, v head-major [C, K, P, Dh]; mask to [C, R, L, P]
) -> jax.Array:
    """Softmax attention over [prefix keys ++ row keys] in float32; returns [C, R, L, K, G, Dh].

    The row keys and the prefix keys are two `_partial_attention`s, merged (`_merge_partials`);
    the prefix comes head-major already (`heads_major`, once per layer).
    """
    row = _partial_attention(q, k, v, row_mask)
    if prefix is None:
        out, _, denom = row
        return (out / denom[..., None]).astype(q.dtype)
    kp, vp, prefix_mask = prefix
    return _merge_partials(row, _partial_attention(q, kp, vp, prefix_mask, shared_keys=True)).astype(q.dtype)


def heads_major(kv: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """A layer's prefix (k, v) [C, P, K, Dh] -> [C, K, P, Dh], the layout the prefix partials read."""
    return tuple(jnp.einsum("cpkd->ckpd", x) for x in kv)


def _partial_attention(q, k, v, mask, shared_keys: bool = False):
    """Unnormalised softmax attention of q [C, R, L, K, G, Dh] over one set of keys, in float32.

    Keys and values are [C, R, M, K, Dh] (each r its own), or with `shared_keys` head-major
    [C, K, M, Dh] for every r (a prefix); `mask` is bool, broadcastable to [C, R, L, M]. Returns
    out [C, R, L, K, G, Dh] (value sum, not yet divided), peak and denom [C, R, L, K, G]: the
    partial results that `_merge_partials` combines into the softmax over the union of key sets.
    """
    f32 = jnp.float32
    q = jnp.einsum("crlkgd->crkgld", q) * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    if shared_keys:
        s = jnp.einsum("crkgld,ckmd->crkglm", q, k, preferred_element_type=f32)
    else:
        k, v = jnp.einsum("crmkd->crkmd", k), jnp.einsum("crmkd->crkmd", v)
        s = jnp.einsum("crkgld,crkmd->crkglm", q, k, preferred_element_type=f32)
    s = jnp.where(mask[:, :, None, None], s, _MASKED)
    peak = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - peak)
    denom = jnp.sum(e, axis=-1)
    pattern = "crkglm,ckmd->crkgld" if shared_keys else "crkglm,crkmd->crkgld"
    out = jnp.einsum(pattern, e.astype(v.dtype), v, preferred_element_type=f32)
    return (
        jnp.einsum("crkgld->crlkgd", out),
        jnp.einsum("crkgl->crlkg", peak[..., 0]),
        jnp.einsum("crkgl->crlkg", denom),
    )


def _merge_partials(a, b) -> jax.Array:
    """Softmax attention over the union of two key sets from their `_partial_attention` results."""
    (out_a, peak_a, denom_a), (out_b, peak_b, denom_b) = a, b
    peak = jnp.maximum(peak_a, peak_b)
    wa, wb = jnp.exp(peak_a - peak), jnp.exp(peak_b - peak)
    return (out_a * wa[..., None] + out_b * wb[..., None]) / (denom_a * wa + denom_b * wb)[..., None]


def _causal_blocks(q, k, v, causal, attention_block: int):
    """`_partial_attention` of causal windows [C, N, W, ...] in query blocks of about `attention_block` (0 = one).

    Queries of block j see only the window's keys up to the block's end, so the scores above the
    diagonal of the later blocks are never computed (W = 208 in blocks of 52: 37% fewer scores).
    """
    width = q.shape[2]
    n = 1 if attention_block <= 0 else -(-width // attention_block)
    size = -(-width // n)
    parts = [
        _partial_attention(
            q[:, :, s : s + size], k[:, :, : s + size], v[:, :, : s + size], causal[:, :, s : s + size, : s + size]
        )
        for s in range(0, width, size)
    ]
    return tuple(jnp.concatenate(p, axis=2) for p in zip(*parts, strict=True))


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(at_most, n)) + 1) if n % d == 0)


def task_window_attention(
    q: jax.Array,  # [C, R, L, K, G, Dh]
    k: jax.Array,  # [C, R, L, K, Dh]
    v: jax.Array,  # [C, R, L, K, Dh]
    windows: TaskWindows,
    causal: tuple[jax.Array, ...],  # per width: bool [C, 1, W, W]
    prefix: tuple[jax.Array, jax.Array, jax.Array],  # k, v [C, K, P, Dh]; mask [C, R * L, P] per row token
) -> jax.Array:
    """Attention of packed rows: each task over its own window, every row token over the prefix.

    Every window gathers its task's queries, keys and values from the flattened rows and attends
    causally inside the window: a query meets only its own task's earlier keys, so none of the
    cross-task (masked) scores of a whole-row attention is computed. The prefix part runs on the
    row tokens themselves (no window position is scored against the prefix), and the two partial
    softmaxes are merged. With `attention_queries` both run a few windows / row tokens at a time
    in loops that slice their inputs themselves, so a step's scores stay in cache.
    """
    c, n_tokens = q.shape[0], q.shape[1] * q.shape[2]
    flat = [a.reshape(c, n_tokens, *a.shape[3:]) for a in (q, k, v)]  # [C, R * L, ...]
    take = jax.vmap(lambda x, i: x[i]) if windows.back.ndim == 2 else (lambda x, i: x[:, i])
    head_shape = q.shape[3:-1]  # (K, G)

    def zeros(n, width):  # partial-result buffers [C, n, width, K, G, Dh], [.., K, G] x 2
        return (
            jnp.zeros((c, n, width, *q.shape[3:]), jnp.float32),
            jnp.zeros((c, n, width, *head_shape), jnp.float32),
            jnp.zeros((c, n, width, *head_shape), jnp.float32),
        )

    def put(bufs, parts, at):
        return tuple(jax.lax.dynamic_update_slice_in_dim(b, p, at, axis=1) for b, p in zip(bufs, parts, strict=True))

    # Task windows, causal: partial results per window position, then back in row order.
    parts = []
    for b, index in enumerate(windows.index):
        n, width = index.shape[-2:]

        def attend(idx, b=b):  # idx [.., s, W] -> partials [C, s, W, ...]
            qw, kw, vw = (take(x, idx) for x in flat)
            return _causal_blocks(qw, kw, vw, causal[b], windows.attention_block)

        per_step = _largest_divisor(n, max(1, windows.attention_queries // width) if windows.attention_queries else n)
        if per_step == n:
            part = attend(index)
        else:

            def step(i, bufs, attend=attend, index=index, per_step=per_step):
                idx = jax.lax.dynamic_slice_in_dim(index, i * per_step, per_step, axis=-2)
                return put(bufs, attend(idx), i * per_step)

            part = jax.lax.fori_loop(0, n // per_step, step, zeros(n, width))
        parts.append(tuple(x.reshape(c, -1, *x.shape[3:]) for x in part))
    window_part = tuple(take(jnp.concatenate(p, axis=1), windows.back) for p in zip(*parts, strict=True))

    # The prefix, on the row tokens: `attention_queries` (or fewer, a divisor) row tokens a step.
    kp, vp, prefix_mask = prefix
    tile = _largest_divisor(n_tokens, windows.attention_queries or n_tokens)

    def prefix_tile(start):
        qt = jax.lax.dynamic_slice_in_dim(flat[0], start, tile, axis=1)[:, None]  # [C, 1, T, K, G, Dh]
        mt = jax.lax.dynamic_slice_in_dim(prefix_mask, start, tile, axis=1)[:, None]  # [C, 1, T, P]
        return _partial_attention(qt, kp, vp, mt, shared_keys=True)  # [C, 1, T, ...]

    if tile == n_tokens:
        prefix_part = tuple(x[:, 0] for x in prefix_tile(0))
    else:
        bufs = jax.lax.fori_loop(
            0, n_tokens // tile, lambda i, bufs: put(bufs, prefix_tile(i * tile), i), zeros(n_tokens // tile, tile)
        )
        prefix_part = tuple(x.reshape(c, n_tokens, *x.shape[3:]) for x in bufs)
    return _merge_partials(window_part, prefix_part).reshape(q.shape).astype(q.dtype)
