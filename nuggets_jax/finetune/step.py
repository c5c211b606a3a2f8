"""The supervised fine-tuning step: its config, optimizer, loss and the one compiled program.

The loss is the cross-entropy of the response (and eos) tokens only, averaged over every such
token of an optimizer step. A step is `micro_batches` x `batch_rows` packed rows of `row_length`
tokens (each example attends only to itself: segment ids, positions from 0), so one static shape
and one compiled program serve the whole run. Gradients of the micro-batches are summed inside
the jitted step (`lax.scan`), then clipped by global norm and applied by AdamW with linear warmup
and cosine decay. Parameters and optimizer state stay in float32; the forward runs in `dtype`.

Data parallel: rows are split over the `data` axis of the mesh, parameters are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nuggets_jax import sharding
from nuggets_jax.finetune.data import FinetuneError
from nuggets_jax.models import DTYPES
from nuggets_jax.models.config import ModelConfig
from nuggets_jax.models.llama import Llama, PrefixCache


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; all but the checkpoint fields are in the resume fingerprint.

    Attributes:
      steps: optimizer steps.
      batch_rows: packed rows per micro-batch over all devices (a multiple of the device count).
      micro_batches: micro-batches accumulated per optimizer step.
      row_length: tokens per packed row; 0 = the smallest multiple of 64 that holds the longest example.
      max_tokens: examples are cut to their first `max_tokens` tokens (response tokens past it are dropped).
      learning_rate: peak learning rate.
      warmup_steps: linear warmup from learning_rate / warmup_steps to the peak.
      end_learning_rate: fraction of the peak reached at the last step by the cosine decay.
      weight_decay: AdamW decoupled weight decay, applied to matrices only (not norms or biases).
      b1, b2, eps: AdamW moments.
      clip_norm: global gradient norm clip.
      dtype: compute dtype of the forward/backward; parameters and optimizer state stay float32.
      seed: data order (a fresh permutation of the examples every epoch).
      eos: end every untruncated example with the tokenizer's eos token (and train on it).
      bos: start every example with the tokenizer's leading special tokens (as zero-shot scoring does).
      lm_head_tokens: positions per LM-head chunk (bounds the [.., V] logits).
      checkpoint_every: save every N steps (the last step is always saved).
      keep_checkpoints: newest checkpoints kept (older ones are deleted).
    """

    steps: int = 100
    batch_rows: int = 8
    micro_batches: int = 1
    row_length: int = 0
    max_tokens: int = 512
    learning_rate: float = 2e-5
    warmup_steps: int = 10
    end_learning_rate: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    eos: bool = True
    bos: bool = True
    lm_head_tokens: int = 1024
    checkpoint_every: int = 50
    keep_checkpoints: int = 2

    def validate(self) -> None:
        """Raises FinetuneError naming the first bad field."""
        positive = ("steps", "batch_rows", "micro_batches", "max_tokens", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise FinetuneError(f"train.{name} must be at least 1, got {getattr(self, name)}.")
        if self.row_length < 0 or self.warmup_steps < 0 or self.lm_head_tokens < 1:
            raise FinetuneError("train.row_length and train.warmup_steps must be >= 0, train.lm_head_tokens >= 1.")
        if not self.learning_rate > 0 or not 0 <= self.end_learning_rate <= 1:
            raise FinetuneError("train.learning_rate must be > 0 and train.end_learning_rate in [0, 1].")
        if self.dtype not in DTYPES:
            raise FinetuneError(f"unknown train.dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}.")
        if not self.clip_norm > 0:
            raise FinetuneError(f"train.clip_norm must be > 0, got {self.clip_norm}.")


def learning_rate_schedule(config: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """lr(count), count = updates already applied: linear warmup to the peak, then cosine to the end value.

    Warmup starts at peak / warmup_steps (not 0), so the first step trains.
    """
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.steps
    end = peak * config.end_learning_rate
    decay_steps = max(1, total - warmup - 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum(1.0, (count + 1.0) / max(1, warmup))
        progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, warm, cosine)

    return schedule


def _decay_mask(params):
    """Weight decay on matrices only: not on norm scales or biases (stacked ones are 2-D too)."""

    def keep(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any("norm" in n or "bias" in n for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; the learning rate actually used is in the state's hyperparams."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=_decay_mask,
    )
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)


def _empty_prefix(model: Llama) -> PrefixCache:
    """A one-slot prefix with no real token, so `forward_rows` runs packed rows on their own."""
    cfg = model.config
    kv = jnp.zeros((cfg.num_layers, 1, 1, cfg.num_kv_heads, cfg.head_dim), model.dtype)
    return PrefixCache(kv, kv, jnp.zeros((1, 1), bool), jnp.zeros((1,), jnp.int32))


def response_loss(model: Llama, micro: dict[str, jax.Array], normalizer: jax.Array, lm_chunk: int) -> jax.Array:
    """sum over weighted positions of -log p(target) / normalizer, log-probs in float32.

    Args:
      model: the model (in its compute dtype).
      micro: tokens, positions, segment_ids, targets [R, L] int and weights [R, L] float.
      normalizer: response tokens of the whole step (all micro-batches), so summed micro-batch
        losses are the step's token mean.
    """
    h = model.forward_rows(_empty_prefix(model), micro["tokens"], micro["positions"], micro["segment_ids"])[0]
    logp, _ = model.token_logprobs(h, micro["targets"], lm_chunk=lm_chunk)  # [R, L]
    return -jnp.sum(logp * micro["weights"]) / normalizer


def step_gradients(graphdef, lm_chunk: int, dtype, params, batch: dict[str, jax.Array], normalizer: jax.Array):
    """Gradient of the step's loss, summed over the K micro-batches of `batch` [K, R, L] (`lax.scan`).

    Each micro-batch's loss is divided by the response tokens of the whole step, so K micro-batches
    give the gradient of one batch of K x R rows. Returns (grads, loss).
    """

    def loss_of(p, micro):
        cast = jax.tree.map(lambda x: x.astype(dtype), p)
        return response_loss(nnx.merge(graphdef, cast), micro, normalizer, lm_chunk)

    def accumulate(grads, micro):
        loss, g = jax.value_and_grad(loss_of)(params, micro)
        return jax.tree.map(jnp.add, grads, g), loss

    grads, losses = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), batch)
    return grads, jnp.sum(losses)


def _train_step(graphdef, optimizer, lm_chunk, dtype, state, batch, normalizer):
    """(params, opt_state), batch [K, R, L] -> new (params, opt_state), metrics. Pure; compiled once."""
    params, opt_state = state
    grads, loss = step_gradients(graphdef, lm_chunk, dtype, params, batch, normalizer)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": opt_state[1].hyperparams["learning_rate"]}
    return (params, opt_state), metrics


# Compiled train steps of this process, keyed by everything the program depends on, so runs of the
# same shapes and optimizer (the variants of a comparison, a resumed run) compile once.
_COMPILED: dict[tuple, Any] = {}
_COMPILED_MAX = 4


def compiled_step(model_config: ModelConfig, config: TrainConfig, row_length: int, mesh, params, opt_state):
    """The AOT-compiled train step for these shapes and this optimizer, and the programs compiled (0 = cached)."""
    n_devices = mesh.devices.size
    lm_chunk = max(8, config.lm_head_tokens // max(1, config.batch_rows // n_devices))
    program_fields = dataclasses.replace(config, seed=0, eos=False, bos=False, checkpoint_every=1, keep_checkpoints=1)
    key = (model_config, program_fields, row_length, tuple(d.id for d in mesh.devices.flat), mesh.axis_names)
    if key in _COMPILED:
        return _COMPILED[key], 0
    dtype = DTYPES[config.dtype]
    compute_graphdef = nnx.split(nnx.eval_shape(lambda: Llama(model_config, dtype=dtype)))[0]
    replicated = sharding.replicated(mesh)
    rows_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    shape = (config.micro_batches, config.batch_rows, row_length)
    ints = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows_sharding)
    batch_spec = {
        "tokens": ints,
        "positions": ints,
        "segment_ids": ints,
        "targets": ints,
        "weights": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rows_sharding),
    }
    state_spec = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), (params, opt_state)
    )
    step_fn = jax.jit(
        functools.partial(_train_step, compute_graphdef, make_optimizer(config), lm_chunk, dtype),
        out_shardings=(jax.tree.map(lambda _: replicated, (params, opt_state)), replicated),
        donate_argnums=(0,),
    )
    compiled = step_fn.lower(
        state_spec, batch_spec, jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    ).compile()
    while len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = compiled
    return compiled, 1


def merge_params(model: Llama, params, dtype: str = "float32") -> Llama:
    """A model with `model`'s architecture and the given parameter state, cast to `dtype`."""
    graphdef = nnx.split(nnx.eval_shape(lambda: Llama(model.config, dtype=DTYPES[dtype])))[0]
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, DTYPES[dtype]), params))
