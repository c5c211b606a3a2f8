"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) in Flax NNX.

Layers are stacked on a leading axis and run under `jax.lax.scan`, so a 30- or 80-layer model
compiles as one layer. Three entry points share the same layer code:

- `__call__` / `hidden`: whole sequences, for parity tests, embeddings and fine-tuning;
- `encode_prefix`: a batch of candidate prefixes -> their per-layer K/V (`PrefixCache`);
- `forward_rows`: rows of task tokens, every row attending to its candidate's cached prefix
  (broadcast inside the attention, never copied per row), several tasks per row allowed
  (segment ids, or `TaskWindows`: each task attends inside its own window), then
  `token_logprobs` applies the LM head only where the caller asks.

The attention kernels of the scoring path (cached prefix ++ packed rows, task windows) live in
`attention.py`; this module is the decoder around them.

Shape letters: N layers, C candidates, R rows, L row tokens, P prefix tokens, K kv heads,
G query heads per kv head, H = K*G heads, Dh head dim, D model dim, F MLP dim, V vocab.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nuggets_jax.models import attention
from nuggets_jax.models.attention import TaskWindows
from nuggets_jax.models.config import ModelConfig


class PrefixCache(NamedTuple):
    """Per-layer keys/values of a batch of prefixes; RoPE already applied to the keys."""

    keys: jax.Array  # [N, C, P, K, Dh]
    values: jax.Array  # [N, C, P, K, Dh]
    mask: jax.Array  # [C, P] bool: real prefix token
    lengths: jax.Array  # [C] int32: real prefix tokens; task positions start here


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse frequencies [Dh/2] in float32, with Llama-3 or linear scaling applied."""
    dh = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # Llama 3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    band = scaling.high_freq_factor - scaling.low_freq_factor
    smooth = (old_len / wavelen - scaling.low_freq_factor) / band
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def _rope_tables(config: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., Dh] for integer positions [...] (rotate-half layout, as in HF)."""
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(config)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., heads, Dh]; cos/sin [..., Dh] broadcast over the heads axis."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # Normalise in float32, cast back, then scale: the order HF uses, so bf16 matches too.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def _linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    y = jnp.einsum("...i,io->...o", x, kernel)
    return y if bias is None else y + bias


class DecoderStack(nnx.Module):
    """All decoder layers, each parameter stacked on a leading [N] axis."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        n, d, f = config.num_layers, config.hidden_size, config.intermediate_size
        hq, hkv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        init = nnx.initializers.normal(0.02)

        def kernel(shape):
            return nnx.Param(init(rngs.params(), (n, *shape), dtype))

        def vector(size, value=0.0):
            return nnx.Param(jnp.full((n, size), value, dtype))

        self.input_norm = vector(d, 1.0)
        self.q_proj = kernel((d, hq))
        self.k_proj = kernel((d, hkv))
        self.v_proj = kernel((d, hkv))
        self.o_proj = kernel((hq, d))
        self.q_bias = vector(hq) if config.qkv_bias else None
        self.k_bias = vector(hkv) if config.qkv_bias else None
        self.v_bias = vector(hkv) if config.qkv_bias else None
        self.o_bias = vector(d) if config.o_bias else None
        self.post_attention_norm = vector(d, 1.0)
        self.gate_proj = kernel((d, f))
        self.up_proj = kernel((d, f))
        self.down_proj = kernel((f, d))
        self.gate_bias = vector(f) if config.mlp_bias else None
        self.up_bias = vector(f) if config.mlp_bias else None
        self.down_bias = vector(d) if config.mlp_bias else None

    def stacked(self) -> dict[str, jax.Array]:
        """The layer parameters as a plain dict of [N, ...] arrays, for `jax.lax.scan`."""
        out = {}
        for name, value in vars(self).items():
            if isinstance(value, nnx.Param):
                out[name] = value[...]
        return out


def _without_prefix(row_mask: jax.Array):
    """The attention of whole rows without a prefix, under `row_mask` [C, R, L, L]."""
    return lambda q, k, v, kv: attention.masked_attention(q, k, v, row_mask, None)


def _decoder_layer(
    config: ModelConfig,
    p: dict[str, jax.Array],
    x: jax.Array,  # [C, R, L, D]
    cos: jax.Array,  # [C, R, L, Dh]
    sin: jax.Array,
    attend,  # (q [C, R, L, K, G, Dh], k, v [C, R, L, K, Dh], this layer's prefix (k, v) or None) -> like q
    prefix_kv: tuple[jax.Array, jax.Array] | None,  # this layer's k, v [C, P, K, Dh]
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One pre-norm decoder layer; returns the new residual stream and this layer's (k, v)."""
    c, r, length, _ = x.shape
    kh, g, dh = config.num_kv_heads, config.groups, config.head_dim
    h = _rms_norm(x, p["input_norm"], config.rms_norm_eps)
    q = _linear(h, p["q_proj"], p.get("q_bias")).reshape(c, r, length, kh * g, dh)
    k = _linear(h, p["k_proj"], p.get("k_bias")).reshape(c, r, length, kh, dh)
    v = _linear(h, p["v_proj"], p.get("v_bias")).reshape(c, r, length, kh, dh)
    q = _apply_rope(q, cos, sin).reshape(c, r, length, kh, g, dh)
    k = _apply_rope(k, cos, sin)
    attn = attend(q, k, v, prefix_kv).reshape(c, r, length, kh * g * dh)
    x = x + _linear(attn, p["o_proj"], p.get("o_bias"))
    h = _rms_norm(x, p["post_attention_norm"], config.rms_norm_eps)
    gate = _linear(h, p["gate_proj"], p.get("gate_bias"))
    up = _linear(h, p["up_proj"], p.get("up_bias"))
    x = x + _linear(jax.nn.silu(gate) * up, p["down_proj"], p.get("down_bias"))
    return x, (k, v)


class Llama(nnx.Module):
    """Llama-family causal LM. Parameters live in `dtype` (float32 on CPU, bfloat16 on TPU/GPU)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        # Shards of the vocabulary axis of the embedding and the LM head on the mesh's `model` axis
        # (`sharding.ShardPlan.vocab_shards`): >1 computes lookups and log-softmax shard by shard.
        self.vocab_shards = 1
        # Recompute each decoder layer in the backward pass (training): "none", "full" or "dots".
        self.remat = "none"
        # Training with FSDP: the layout of the [C, R, L, D] residual stream (rows over `data`), pinned
        # at every layer so XLA gathers the weights rather than all-reducing activations; None = free.
        self.activation_sharding = None
        d, vocab = config.hidden_size, config.vocab_size
        self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab, d), dtype))
        self.layers = DecoderStack(config, dtype=dtype, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((d,), dtype))
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d, vocab), dtype))
        )

    # -- the shared trunk ---------------------------------------------------------------------

    def _run_layers(
        self,
        x: jax.Array,  # [C, R, L, D]
        positions: jax.Array,  # [C, R, L] int
        attend,
        prefix: PrefixCache | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        config = self.config
        cos, sin = _rope_tables(config, positions, self.dtype)

        pin = self.activation_sharding

        def body(x, layer):
            params, kv = layer
            if pin is not None:
                x = jax.lax.with_sharding_constraint(x, pin)
            x, kv = _decoder_layer(config, params, x, cos, sin, attend, kv)
            return (x if pin is None else jax.lax.with_sharding_constraint(x, pin)), kv

        if self.remat != "none":
            policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots" else None
            body = jax.checkpoint(body, policy=policy)

        kv_in = None if prefix is None else (prefix.keys, prefix.values)
        x, kv_out = jax.lax.scan(body, x, (self.layers.stacked(), kv_in))
        return _rms_norm(x, self.final_norm[...], config.rms_norm_eps), kv_out

    def _window(self, query_pos: jax.Array, key_pos: jax.Array) -> jax.Array | bool:
        """Sliding-window condition (Mistral): a query sees keys less than `window` behind it."""
        if self.config.sliding_window is None:
            return True
        return (query_pos[..., :, None] - key_pos[..., None, :]) < self.config.sliding_window

    # -- whole sequences ------------------------------------------------------------------------

    def hidden(
        self, tokens: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """Final-norm hidden states [B, L, D] of whole sequences.

        Args:
          tokens: [B, L] int token ids.
          attention_mask: [B, L], 1/True for real tokens (padding on either side), default all real.
          positions: [B, L] RoPE positions; default 0..L-1 (HF's default, right for right padding).
        """
        b, length = tokens.shape
        valid = jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (b, length))
        causal = jnp.tril(jnp.ones((length, length), bool))
        row_mask = causal[None] & valid[:, None, :] & self._window(positions, positions)  # [B, L, L]
        x = self.embed_tokens(tokens)[:, None]  # [B, 1, L, D]
        h, _ = self._run_layers(x, positions[:, None], _without_prefix(row_mask[:, None]), None)
        return h[:, 0]

    def __call__(
        self, tokens: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """Logits [B, L, V] in float32 of whole sequences (see `hidden` for the arguments)."""
        return self.logits(self.hidden(tokens, attention_mask, positions))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Embedding rows [..., D] of token ids [...]; with vocabulary shards each shard looks up the
        ids it holds and the shards' rows are summed (one nonzero term each, so exact)."""
        table, shards = self.embed[...], self.vocab_shards
        if shards == 1:
            return table[tokens]
        per = table.shape[0] // shards
        local = tokens[None] - (jnp.arange(shards) * per).reshape(shards, *[1] * tokens.ndim)  # [S, ...]
        rows = jax.vmap(lambda t, i: t[i])(table.reshape(shards, per, -1), jnp.clip(local, 0, per - 1))
        inside = (local >= 0) & (local < per)
        return jnp.sum(jnp.where(inside[..., None], rows, jnp.zeros((), rows.dtype)), axis=0)

    def _shard_logits(self, h: jax.Array, start, width: int) -> jax.Array:
        """Logits [S, ..., width] in float32 of entries start .. start + width - 1 of every vocabulary shard."""
        shards = self.vocab_shards
        if self.lm_head is None:
            w = self.embed[...].reshape(shards, -1, h.shape[-1])  # [S, V/S, D]
            w = jax.lax.dynamic_slice_in_dim(w, start, width, axis=1)
            return jnp.einsum("...d,svd->s...v", h, w, preferred_element_type=jnp.float32)
        w = self.lm_head[...].reshape(h.shape[-1], shards, -1)  # [D, S, V/S]
        w = jax.lax.dynamic_slice_in_dim(w, start, width, axis=2)
        return jnp.einsum("...d,dsv->s...v", h, w, preferred_element_type=jnp.float32)

    def logits(self, h: jax.Array) -> jax.Array:
        """LM head: hidden [..., D] -> logits [..., V] in float32."""
        return self._logits_slice(h, 0, self.config.vocab_size)

    def _logits_slice(self, h: jax.Array, start, width: int) -> jax.Array:
        """Logits [..., width] in float32 of the vocabulary entries start .. start + width - 1."""
        if self.lm_head is None:
            w = jax.lax.dynamic_slice_in_dim(self.embed[...], start, width, axis=0)  # [width, D]
            return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        w = jax.lax.dynamic_slice_in_dim(self.lm_head[...], start, width, axis=1)  # [D, width]
        return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)

    # -- prefix-cached scoring ----------------------------------------------------------------

    def encode_prefix(self, tokens: jax.Array, mask: jax.Array) -> PrefixCache:
        """Encodes candidate prefixes once.

        Args:
          tokens: [C, P] int, right-padded.
          mask: [C, P], True for real tokens. A row may be all padding (the zero-shot "candidate").
        Returns:
          The per-layer K/V and mask of every prefix.
        """
        c, p = tokens.shape
        mask = mask.astype(bool)
        positions = jnp.broadcast_to(jnp.arange(p), (c, p))
        causal = jnp.tril(jnp.ones((p, p), bool))
        row_mask = (causal[None] & mask[:, None, :] & self._window(positions, positions))[:, None]
        x = self.embed_tokens(tokens)[:, None]
        _, (keys, values) = self._run_layers(x, positions[:, None], _without_prefix(row_mask), None)
        # scan stacked [N, C, 1, P, K, Dh]; drop the row axis.
        return PrefixCache(keys[:, :, 0], values[:, :, 0], mask, jnp.sum(mask, axis=1).astype(jnp.int32))

    def forward_rows(
        self,
        prefix: PrefixCache,
        tokens: jax.Array,  # [R, L] or [C, R, L] int
        task_positions: jax.Array,  # [R, L] or [C, R, L]: position inside its task, from 0
        segment_ids: jax.Array,  # [R, L] or [C, R, L]: index of its task in the row, -1 for padding
        windows: TaskWindows | None = None,
    ) -> jax.Array:
        """Hidden states [C, R, L, D] of task rows that follow each candidate's prefix.

        A row may hold several tasks back to back (packing); a token attends to every real token
        of its candidate's prefix and to the earlier tokens of its own task. Its RoPE position is
        prefix length + position inside the task, exactly as if prefix and task were one sequence.

        Without `windows` a row's attention is one masked [L, L] block (segment ids keep tasks
        apart); with them every task attends inside its own window (`TaskWindows`), so the work no
        longer grows with the row length and no cross-task score is computed.
        """
        c = prefix.mask.shape[0]
        tokens, task_positions, segment_ids = (
            jnp.broadcast_to(a, (c, *a.shape[-2:])) for a in (tokens, task_positions, segment_ids)
        )
        positions = prefix.lengths[:, None, None] + task_positions  # [C, R, L]
        absolute = prefix.lengths[:, None, None]
        p = prefix.mask.shape[1]

        def prefix_mask(q_pos):  # q_pos [C, X, Q] -> [C, X, Q, P]
            mask = jnp.broadcast_to(prefix.mask[:, None, None, :], (*q_pos.shape, p))
            if self.config.sliding_window is not None:
                mask = mask & self._window(absolute + q_pos, jnp.arange(p))
            return mask

        pm = prefix_mask(task_positions)  # [C, R, L, P]
        if windows is None:
            same_task = segment_ids[..., :, None] == segment_ids[..., None, :]
            earlier = task_positions[..., :, None] >= task_positions[..., None, :]
            real = (segment_ids >= 0)[..., None, :]
            row_mask = same_task & earlier & real & self._window(absolute + task_positions, absolute + task_positions)

            def attend(q, k, v, kv):
                return attention.masked_attention(q, k, v, row_mask, (*attention.heads_major(kv), pm))
        else:
            causal = []
            for index in windows.index:
                w = index.shape[-1]
                q_pos = jnp.broadcast_to(jnp.arange(w), (c, 1, w))  # a window starts at its task's first token
                causal.append(
                    (q_pos[..., :, None] >= q_pos[..., None, :]) & self._window(absolute + q_pos, absolute + q_pos)
                )
            row_pm = pm.reshape(c, -1, p)  # [C, R * L, P]

            def attend(q, k, v, kv):
                return attention.task_window_attention(
                    q, k, v, windows, tuple(causal), (*attention.heads_major(kv), row_pm)
                )

        x = self.embed_tokens(tokens)
        h, _ = self._run_layers(x, positions, attend, prefix)
        return h

    def token_logprobs(
        self, h: jax.Array, targets: jax.Array, lm_chunk: int = 512, lm_head_vocab_tile: int = 0
    ) -> tuple[jax.Array, jax.Array]:
        """log p(target) and whether the argmax is the target, at chosen positions.

        The LM head runs over `lm_chunk` positions at a time (per leading index) and, with
        `lm_head_vocab_tile`, over that many vocabulary entries at a time with a running log-sum-exp, so
        only [..., lm_chunk, lm_head_vocab_tile] logits exist at once: on CPU they stay in cache between the
        matmul and the softmax. 0 = the whole vocabulary in one tile.

        Args:
          h: [..., M, D] final-norm hidden states at the positions that predict `targets`.
          targets: [..., M] int token ids.
          lm_chunk: positions per LM-head call.
          lm_head_vocab_tile: vocabulary entries per tile (0 = all).
        Returns:
          logp [..., M] float32, correct [..., M] bool (argmax == target, ties to the first index).
        """
        m = h.shape[-2]
        lm_chunk = max(1, min(lm_chunk, m))
        pad = (-m) % lm_chunk
        lead = h.shape[:-2]
        hs = jnp.pad(h, [(0, 0)] * len(lead) + [(0, pad), (0, 0)])
        ts = jnp.pad(targets, [(0, 0)] * len(lead) + [(0, pad)])
        # [n_chunks, ..., lm_chunk, D]: map over chunks, keep the leading (sharded) axes intact.
        hs = jnp.moveaxis(hs.reshape(*lead, -1, lm_chunk, h.shape[-1]), -3, 0)
        ts = jnp.moveaxis(ts.reshape(*lead, -1, lm_chunk), -2, 0)
        shards = self.vocab_shards
        vocab = self.config.vocab_size // shards  # entries per shard
        tile = vocab if lm_head_vocab_tile <= 0 else min(lm_head_vocab_tile, vocab)
        full_tiles, rest = divmod(vocab, tile)

        def one(args):
            hc, tc = args
            # With S vocabulary shards every statistic carries a leading [S] axis (split over the
            # mesh's `model` axis), offsets are of the shard's entries; the shards are reduced last.
            offsets = (jnp.arange(shards) * vocab).reshape(shards, *[1] * tc.ndim) if shards > 1 else 0

            def logits_of(start, width):
                if shards == 1:
                    return self._logits_slice(hc, start, width)  # [..., lm_chunk, width] float32
                return self._shard_logits(hc, start, width)  # [S, ..., lm_chunk, width]

            def update(carry, start, width):
                peak, total, target_logit, first = carry
                logits = logits_of(start, width)
                tile_peak = jnp.max(logits, axis=-1)
                new_peak = jnp.maximum(peak, tile_peak)
                total = total * jnp.exp(peak - new_peak) + jnp.sum(jnp.exp(logits - new_peak[..., None]), axis=-1)
                local = tc - offsets - start
                picked = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[..., None], axis=-1)[..., 0]
                target_logit = jnp.where((local >= 0) & (local < width), picked, target_logit)
                # argmax's rule (the first index of the maximum) without its slow variadic reduce: the
                # smallest index holding the tile's maximum; an earlier tile keeps a tied maximum.
                at_peak = jnp.where(logits == tile_peak[..., None], jnp.arange(width), width)
                tile_first = offsets + start + jnp.min(at_peak, axis=-1)
                first = jnp.where(tile_peak > peak, tile_first, first)
                return new_peak, total, target_logit, first

            shape = tc.shape if shards == 1 else (shards, *tc.shape)
            zeros = jnp.zeros(shape, jnp.float32)
            carry = (jnp.full(shape, -jnp.inf, jnp.float32), zeros, zeros, jnp.zeros(shape, jnp.int32))
            if full_tiles == 1:
                carry = update(carry, 0, tile)
            else:
                carry = jax.lax.fori_loop(0, full_tiles, lambda i, c: update(c, i * tile, tile), carry)
            if rest:
                carry = update(carry, full_tiles * tile, rest)
            peak, total, target_logit, first = carry
            if shards > 1:  # across shards: the same running rules, the earliest shard wins a tie
                top = jnp.max(peak, axis=0)
                total = jnp.sum(total * jnp.exp(peak - top), axis=0)
                target_logit = jnp.sum(target_logit, axis=0)  # zero in every shard but the target's
                first = jnp.min(jnp.where(peak == top, first, self.config.vocab_size), axis=0)
                peak = top
            return target_logit - (peak + jnp.log(total)), first == tc

        logp, correct = jax.lax.map(one, (hs, ts))
        logp = jnp.moveaxis(logp, 0, -2).reshape(*lead, -1)[..., :m]
        correct = jnp.moveaxis(correct, 0, -2).reshape(*lead, -1)[..., :m]
        return logp, correct
