"""The supervised fine-tuning step: its config, optimizer, loss and the one compiled program.

The loss is the cross-entropy of the response (and eos) tokens only, averaged over every such
token of an optimizer step. A step is `micro_batches` x `batch_rows` packed rows of `row_length`
tokens (each example attends only to itself: segment ids, positions from 0), so one static shape
and one compiled program serve the whole run. Gradients of the micro-batches are summed inside
the jitted step (`lax.scan`), then clipped by global norm and applied by AdamW with linear warmup
and cosine decay. Parameters and optimizer state stay in float32; the forward runs in `dtype`.

Rows are split over the `data` axis of the mesh. The parameters, the gradient accumulator and both
AdamW moments are laid out by the scoring sharding table on `model` (tensor parallel) and, with
FSDP, over `data` as well (`sharding.train_spec`); XLA gathers a layer's weights where it runs.
Each decoder layer can be rematerialised in the backward pass (`remat`).
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
      batch_rows: packed rows per micro-batch over all devices (a multiple of the mesh's data rows).
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
      fsdp: "auto" | "on" | "off": shard the parameters, gradients and optimizer state over `data`
        too; auto = on when the replicated state (16 bytes a parameter) would not fit a device.
      remat: "auto" | "none" | "full" | "dots": recompute each decoder layer in the backward pass
        (full: save nothing inside a layer; dots: save its matmul outputs); auto = none on CPU, full
        on GPU/TPU.
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
    dtype: str = "auto"
    seed: int = 0
    eos: bool = True
    bos: bool = True
    lm_head_tokens: int = 1024
    fsdp: str = "auto"
    remat: str = "auto"
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
        if self.dtype not in (*DTYPES, "auto"):
            raise FinetuneError(f"unknown train.dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)} (or auto).")
        if self.fsdp not in ("auto", "on", "off"):
            raise FinetuneError(f"unknown train.fsdp {self.fsdp!r}; choose auto, on or off.")
        if self.remat not in REMAT_POLICIES:
            raise FinetuneError(f"unknown train.remat {self.remat!r}; choose one of: {', '.join(REMAT_POLICIES)}.")
        if not self.clip_norm > 0:
            raise FinetuneError(f"train.clip_norm must be > 0, got {self.clip_norm}.")

    def resolved(self, platform: str, state_bytes: int | None = None, memory_limit: int | None = None) -> TrainConfig:
        """The "auto" fields decided: dtype and remat by platform, FSDP (once `state_bytes`, the
        replicated training state per device, is known) by whether it fits `memory_limit`."""
        from nuggets_jax.models import resolve_dtype
        from nuggets_jax.scoring.memory import PARAM_SHARE

        accel = platform != "cpu"
        fsdp = self.fsdp
        if fsdp == "auto" and state_bytes is not None:
            fsdp = "on" if memory_limit is not None and state_bytes > PARAM_SHARE * memory_limit else "off"
        remat = self.remat if self.remat != "auto" else ("full" if accel else "none")
        return dataclasses.replace(self, dtype=resolve_dtype(self.dtype, platform), fsdp=fsdp, remat=remat)


# Decoder-layer rematerialisation: the policy of `jax.checkpoint` (None = save nothing of a layer).
REMAT_POLICIES = {
    "auto": None,
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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


def step_gradients(
    graphdef,
    lm_chunk: int,
    dtype,
    params,
    batch: dict[str, jax.Array],
    normalizer: jax.Array,
    layout: StepLayout | None = None,
):
    """Gradient of the step's loss, summed over the K micro-batches of `batch` [K, R, L] (`lax.scan`).

    Each micro-batch's loss is divided by the response tokens of the whole step, so K micro-batches
    give the gradient of one batch of K x R rows. The accumulator keeps the parameters' layout.
    Returns (grads, loss).
    """
    layout = layout or StepLayout()

    def loss_of(p, micro):
        cast = jax.tree.map(lambda x: x.astype(dtype), p)
        model = nnx.merge(graphdef, cast)
        model.vocab_shards, model.remat = layout.vocab_shards, layout.remat
        model.activation_sharding = layout.activations
        return response_loss(model, micro, normalizer, lm_chunk)

    def constrain(tree):
        return tree if layout.shardings is None else jax.lax.with_sharding_constraint(tree, layout.shardings)

    def accumulate(grads, micro):
        loss, g = jax.value_and_grad(loss_of)(params, micro)
        return constrain(jax.tree.map(jnp.add, grads, g)), loss

    grads, losses = jax.lax.scan(accumulate, constrain(jax.tree.map(jnp.zeros_like, params)), batch)
    return grads, jnp.sum(losses)


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """How the step program lays out its state: the parameters' shardings (None = as they come),
    the vocabulary shards of the LM head, the decoder-layer remat policy and the residual stream's
    layout (rows over `data`: with FSDP, XLA then gathers each layer's weights instead of summing
    partial activations of the whole batch on every device)."""

    shardings: Any = None
    vocab_shards: int = 1
    remat: str = "none"
    activations: Any = None  # NamedSharding of the [1, R, L, D] residual stream (rows over `data`)


def _train_step(graphdef, optimizer, lm_chunk, dtype, layout, state, batch, normalizer):
    """(params, opt_state), batch [K, R, L] -> new (params, opt_state), metrics. Pure; compiled once."""
    params, opt_state = state
    grads, loss = step_gradients(graphdef, lm_chunk, dtype, params, batch, normalizer, layout)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": opt_state[1].hyperparams["learning_rate"]}
    return (params, opt_state), metrics


# Compiled train steps of this process, keyed by everything the program depends on, so runs of the
# same shapes and optimizer (the variants of a comparison, a resumed run) compile once.
_COMPILED: dict[tuple, Any] = {}
_COMPILED_MAX = 4


def state_shardings(model_config: ModelConfig, config: TrainConfig, mesh, params, opt_state):
    """NamedShardings of (params, opt_state) on `mesh`: the sharding table on `model`, FSDP over `data`."""
    plan = sharding.ShardPlan.of(model_config, sharding.model_size(mesh))
    fsdp = config.fsdp == "on"
    return sharding.train_shardings(mesh, plan, params, fsdp), sharding.train_shardings(mesh, plan, opt_state, fsdp)


def compiled_step(model_config: ModelConfig, config: TrainConfig, row_length: int, mesh, params, opt_state):
    """The AOT-compiled train step for these shapes and this optimizer, and the programs compiled (0 = cached).

    `config` is resolved (`TrainConfig.resolved`); params and opt_state may be arrays or
    ShapeDtypeStructs (e.g. for the memory table: nothing is allocated to compile).
    """
    data = sharding.data_size(mesh)
    lm_chunk = max(8, config.lm_head_tokens // max(1, config.batch_rows // data))
    program_fields = dataclasses.replace(config, seed=0, eos=False, bos=False, checkpoint_every=1, keep_checkpoints=1)
    key = (model_config, program_fields, row_length, tuple(d.id for d in mesh.devices.flat), mesh.devices.shape)
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
    shardings = state_shardings(model_config, config, mesh, params, opt_state)
    state_spec = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), (params, opt_state), shardings
    )
    plan = sharding.ShardPlan.of(model_config, sharding.model_size(mesh))
    activations = NamedSharding(mesh, PartitionSpec(None, "data", None, None))
    layout = StepLayout(shardings[0], plan.vocab_shards, config.remat, activations)
    step_fn = jax.jit(
        functools.partial(_train_step, compute_graphdef, make_optimizer(config), lm_chunk, dtype, layout),
        in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, batch_spec), replicated),
        out_shardings=(shardings, replicated),
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
    """A model with `model`'s architecture and the given parameter state, cast to `dtype` ("auto": by platform)."""
    from nuggets_jax.models import resolve_dtype

    dtype = resolve_dtype(dtype, jax.default_backend())
    graphdef = nnx.split(nnx.eval_shape(lambda: Llama(model.config, dtype=DTYPES[dtype])))[0]
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, DTYPES[dtype]), params))
