"""Supervised fine-tuning of the Llama NNX model on a subset (golden, random or the full pool).

The examples (`finetune_data`) are `[leading special tokens] prompt ids ++ response ids [++ eos]`
with an exact response span; the loss is the cross-entropy of the response (and eos) tokens only,
averaged over every such token of an optimizer step. Examples are packed into rows of
`row_length` tokens (each attends only to itself: segment ids, positions from 0), a step is
`micro_batches` x `batch_rows` rows, so one static shape and one compiled program serve the whole
run. Gradients of the micro-batches are summed inside the jitted step (`lax.scan`), then clipped
by global norm and applied by AdamW with linear warmup and cosine decay. Parameters and optimizer
state stay in float32; the forward runs in `dtype`.

Data parallel: rows are split over the `data` axis of the mesh, parameters are replicated.

A run directory holds `ckpt_<step>/` checkpoints (`checkpoint`: HF layout, so
`load_model`/`load_params` read it back, plus the optimizer and trainer state), each written to a
temporary directory and renamed, and `train_log.jsonl`. A killed run resumes from its newest
checkpoint with the same data order and learning rates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nuggets_jax import sharding
from nuggets_jax import store as store_lib
from nuggets_jax.checkpoint import checkpoint_dirs, keep_newest, load_checkpoint, remove_unfinished, save_checkpoint
from nuggets_jax.finetune_data import Batch, DataOrder, Examples, FinetuneError, auto_row_length, make_batch
from nuggets_jax.models import DTYPES
from nuggets_jax.models.config import ModelConfig
from nuggets_jax.models.llama import Llama, PrefixCache

_LOG_NAME = "train_log.jsonl"


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


# -- the optimizer and the pure train step ---------------------------------------------------------


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
    logp, _ = model.token_logprobs(h, micro["targets"], chunk=lm_chunk)  # [R, L]
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


def _compiled_step(model_config: ModelConfig, config: TrainConfig, row_length: int, mesh, params, opt_state):
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


# -- the training loop ---------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What a run produced. `params` is the final float32 parameter state (merge with the model's graphdef)."""

    params: Any
    run_dir: pathlib.Path
    final_checkpoint: pathlib.Path
    log: list[dict[str, Any]]
    resumed_from: int  # step of the checkpoint this invocation started from (0 = fresh)
    steps_run: int  # steps computed by this invocation
    wall_s: float  # training loop time of this invocation (compile excluded)
    compile_s: float
    programs: int  # XLA programs compiled for the training loop
    tokens_per_s: float  # real (unpadded) tokens per second of this invocation
    row_length: int
    fill: float  # real tokens / token slots over the run

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("params", "log")}
        out["run_dir"], out["final_checkpoint"] = str(self.run_dir), str(self.final_checkpoint)
        out["final_loss"] = self.log[-1]["loss"] if self.log else None
        out["train_tokens"] = int(sum(e["tokens"] for e in self.log))
        return out


def _restore(
    run_dir: pathlib.Path, fingerprint: dict, model_config: ModelConfig, opt_template, fresh: bool, steps: int
):
    """(step, checkpoint, params, opt_state) of the newest checkpoint of this run, or None to start fresh.

    Raises:
      FinetuneError: the directory holds checkpoints of a different run and `fresh` is False.
    """
    existing = checkpoint_dirs(run_dir)
    if not existing:
        return None
    step, path = existing[-1]
    saved = json.loads((path / "trainer_state.json").read_text()).get("fingerprint", {})
    if saved == fingerprint:
        params, opt_state, _ = load_checkpoint(path, model_config, opt_template)
        if opt_state is None and step < steps:
            raise FinetuneError(
                f"{path}: has no optimizer state to resume from; delete it to resume from an older one."
            )
        return step, path, params, opt_template if opt_state is None else opt_state
    changed = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
    if not fresh:
        raise FinetuneError(
            f"{run_dir}: holds checkpoints of a different run (changed: {', '.join(changed)}); "
            "use another directory, or fresh=True (--config.fresh=True) to delete them."
        )
    for _, old in existing:
        shutil.rmtree(old)
    (run_dir / _LOG_NAME).unlink(missing_ok=True)
    return None


def _read_log(path: pathlib.Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if x["step"] <= upto]


def train(
    model: Llama,
    examples: Examples,
    config: TrainConfig,
    run_dir: str | pathlib.Path,
    hf_config: dict,
    tokenizer_dir: str | pathlib.Path | None = None,
    mesh: jax.sharding.Mesh | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    fingerprint_extra: dict[str, Any] | None = None,
    fresh: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tunes `model` on `examples`, resuming from the newest checkpoint in `run_dir`.

    Args:
      model: the starting model (its parameters are copied to float32; the model is not changed).
      examples: from `tokenize_examples`.
      config: the run's hyperparameters.
      run_dir: checkpoints and train_log.jsonl go here; an earlier run of the same fingerprint resumes.
      hf_config: config.json written with every checkpoint.
      tokenizer_dir: tokenizer files copied into every checkpoint (None = none).
      mesh: default all devices (`sharding.make_mesh`).
      log: progress messages.
      progress: show a tqdm bar with loss and tokens/s.
      fingerprint_extra: more things a resume must match (e.g. the base model's fingerprint).
      fresh: delete checkpoints of a run with a different fingerprint instead of refusing.
      on_step: called after each step with (step, metrics) on process 0.
    Raises:
      FinetuneError: bad config or a run directory that holds a different run.
    """
    config.validate()
    t_start = time.perf_counter()
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_unfinished(run_dir)
    mesh = mesh or sharding.make_mesh()
    n_devices = mesh.devices.size
    if config.batch_rows % n_devices:
        raise FinetuneError(
            f"train.batch_rows={config.batch_rows} must be a multiple of the {n_devices} devices; "
            f"use {math.ceil(config.batch_rows / n_devices) * n_devices}."
        )
    row_length = config.row_length or auto_row_length(examples)
    if int(examples.lengths.max()) > row_length:
        raise FinetuneError(
            f"the longest example has {int(examples.lengths.max())} tokens but train.row_length={row_length}; "
            "set train.row_length=0 (auto) or lower train.max_tokens."
        )
    is_main = jax.process_index() == 0
    fingerprint = {
        "config": {
            k: v for k, v in dataclasses.asdict(config).items() if k not in ("checkpoint_every", "keep_checkpoints")
        },
        "row_length": row_length,
        "examples": examples.digest(),
        "extra": fingerprint_extra or {},
    }

    # A copy: the compiled step donates its input buffers, and the caller keeps its model.
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), nnx.split(model)[1])
    graphdef_f32 = nnx.split(nnx.eval_shape(lambda: Llama(model.config, dtype=jnp.float32)))[0]
    opt_state = make_optimizer(config).init(params)
    start, final_path = 0, None
    restored = _restore(run_dir, fingerprint, model.config, opt_state, fresh, config.steps)
    if restored is not None:
        start, final_path, params, opt_state = restored
        log(f"finetune: resuming {run_dir} from step {start}")
    history = _read_log(run_dir / _LOG_NAME, start)
    if is_main:
        store_lib.atomic_write_bytes(run_dir / _LOG_NAME, "".join(json.dumps(x) + "\n" for x in history).encode())

    order = DataOrder(examples.lengths, config.seed, config.batch_rows, row_length, config.micro_batches)
    order.skip(start)
    replicated = sharding.replicated(mesh)
    rows_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(opt_state, replicated)

    if start >= config.steps:
        log(f"finetune: {run_dir} already finished ({start} steps)")
        return TrainResult(params, run_dir, final_path, history, start, 0, 0.0, 0.0, 0, 0.0, row_length, _fill(history))

    t0 = time.perf_counter()
    compiled, programs = _compiled_step(model.config, config, row_length, mesh, params, opt_state)
    compile_s = time.perf_counter() - t0
    log(
        f"finetune: {len(examples.ids)} examples, {n_devices} device(s), step = {config.micro_batches} x "
        f"{config.batch_rows} rows x {row_length} tokens, steps {start}->{config.steps}, "
        f"{programs} program(s) compiled in {compile_s:.1f}s"
    )

    def put(batch: Batch) -> dict[str, jax.Array]:
        arrays = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        if jax.process_count() == 1:
            return {k: jax.device_put(v, rows_sharding) for k, v in arrays.items()}
        local = sharding.local_slots(mesh, config.batch_rows)
        return {
            k: jax.make_array_from_process_local_data(rows_sharding, v[:, local], v.shape) for k, v in arrays.items()
        }

    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=run_dir.name, unit="step", dynamic_ncols=True)
    state = (params, opt_state)
    real_tokens = 0
    t_loop = t_done = time.perf_counter()
    pending: tuple[int, Batch, dict] | None = None
    last_saved = start

    def finish(step: int, batch: Batch, metrics: dict) -> None:
        nonlocal real_tokens, t_done
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        real_tokens += batch.real_tokens
        now = time.perf_counter()
        elapsed = now - t_loop
        entry = {
            "step": step,
            **values,
            "tokens": batch.real_tokens,
            "response_tokens": batch.response_tokens,
            "examples": batch.num_examples,
            "token_slots": int(batch.tokens.size),
            "wall_s": now - t_done,  # since the previous step finished (steps overlap with host work)
        }
        t_done = now
        history.append(entry)
        if not math.isfinite(values["loss"]):
            raise FinetuneError(f"{run_dir}: loss became {values['loss']} at step {step}; lower train.learning_rate.")
        if is_main:
            with open(run_dir / _LOG_NAME, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", tok_s=f"{real_tokens / elapsed:.0f}"
                )
            if on_step is not None:
                on_step(step, entry)

    try:
        for step in range(start + 1, config.steps + 1):
            batch = make_batch(examples, order.next_step(), config.batch_rows, row_length)
            normalizer = jax.device_put(np.float32(max(1, batch.response_tokens)), replicated)
            state, metrics = compiled(state, put(batch), normalizer)
            # The previous step's metrics are fetched while this one runs.
            if pending is not None:
                finish(*pending)
            pending = (step, batch, metrics)
            if step % config.checkpoint_every == 0 or step == config.steps:
                finish(*pending)
                pending = None
                if is_main:
                    final_path = save_checkpoint(
                        run_dir,
                        step,
                        graphdef_f32,
                        state[0],
                        state[1],
                        {"fingerprint": fingerprint, "stream_position": order.position, "row_length": row_length},
                        hf_config,
                        pathlib.Path(tokenizer_dir) if tokenizer_dir else None,
                        with_optimizer=step < config.steps,
                    )
                    keep_newest(run_dir, config.keep_checkpoints)
                last_saved = step
        if pending is not None:
            finish(*pending)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t_loop
    steps_run = config.steps - start
    log(
        f"finetune: {steps_run} steps in {wall:.1f}s ({real_tokens / max(wall, 1e-9):.0f} tokens/s), "
        f"final loss {history[-1]['loss']:.4f}, checkpoint {final_path} (step {last_saved}); "
        f"total {time.perf_counter() - t_start:.1f}s"
    )
    return TrainResult(
        state[0],
        run_dir,
        final_path,
        history,
        start,
        steps_run,
        wall,
        compile_s,
        programs,
        real_tokens / max(wall, 1e-9),
        row_length,
        _fill(history),
    )


def _fill(history: Sequence[dict]) -> float:
    slots = sum(e["token_slots"] for e in history)
    return sum(e["tokens"] for e in history) / slots if slots else 0.0


def merge_params(model: Llama, params, dtype: str = "float32") -> Llama:
    """A model with `model`'s architecture and the given parameter state, cast to `dtype`."""
    graphdef = nnx.split(nnx.eval_shape(lambda: Llama(model.config, dtype=DTYPES[dtype])))[0]
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, DTYPES[dtype]), params))
