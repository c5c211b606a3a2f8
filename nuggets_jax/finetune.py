"""Supervised fine-tuning of the Llama NNX model on a subset (golden, random or the full pool).

A training example is `[leading special tokens] prompt ids ++ response ids [++ eos]`, tokenized
by `nuggets_jax.data` so the response span is exact; the loss is the cross-entropy of the
response (and eos) tokens only, averaged over every such token of an optimizer step. Examples
are packed into rows of `row_length` tokens (each attends only to itself: segment ids, positions
from 0), a step is `micro_batches` x `batch_rows` rows, so one static shape and one compiled
program serve the whole run. Gradients of the micro-batches are summed inside the jitted step
(`lax.scan`), then clipped by global norm and applied by AdamW with linear warmup and cosine
decay. Parameters and optimizer state stay in float32; the forward runs in `dtype`.

Data parallel: rows are split over the `data` axis of the mesh, parameters are replicated.

A run directory holds `ckpt_<step>/` checkpoints (HF layout: config.json, model.safetensors and
the tokenizer, so `load_model`/`load_params` read it back; plus optimizer.npz and
trainer_state.json), each written to a temporary directory and renamed, and `train_log.jsonl`.
A killed run resumes from its newest checkpoint with the same data order and learning rates.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
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

from nuggets_jax import data as data_lib
from nuggets_jax import sharding
from nuggets_jax import store as store_lib
from nuggets_jax.models import DTYPES, TOKENIZER_FILES
from nuggets_jax.models.config import ModelConfig
from nuggets_jax.models.llama import Llama, PrefixCache
from nuggets_jax.models.params import load_params, save_params

_CHECKPOINT_PREFIX = "ckpt_"
_LOG_NAME = "train_log.jsonl"


class FinetuneError(ValueError):
    """A training config, data set or run directory that cannot be used; the message says what to change."""


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


# -- examples and packing ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Examples:
    """Tokenized training examples: `ids[i][response_start[i]:]` is the trained span."""

    ids: list[np.ndarray]  # E x [n_e] int32
    response_start: np.ndarray  # [E]
    record_ids: list[str]

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(x) for x in self.ids], np.int64)

    def digest(self) -> str:
        """sha256 over the token ids and response spans (what training sees)."""
        h = hashlib.sha256()
        for ids, start in zip(self.ids, self.response_start, strict=True):
            h.update(np.int64(start).tobytes())
            h.update(np.asarray(ids, np.int32).tobytes())
            h.update(b"|")
        return h.hexdigest()


def tokenize_examples(
    tokenizer,
    records: Sequence[data_lib.Record],
    template: data_lib.Template,
    max_tokens: int = 512,
    eos: bool = True,
    bos: bool = True,
    source: str = "train",
) -> Examples:
    """`[leading specials] prompt ++ response [++ eos]`, cut to `max_tokens` (no eos after a cut).

    Raises:
      DataError: a record keeps no response token within `max_tokens` (names the ids).
      FinetuneError: `eos` is asked for but the tokenizer has no eos token.
    """
    lead = data_lib.leading_special_tokens(tokenizer) if bos else []
    eos_id = tokenizer.eos_token_id if eos else None
    if eos and eos_id is None:
        raise FinetuneError(f"{source}: the tokenizer has no eos token; set train.eos=False.")
    room = max_tokens - len(lead)
    uncut = data_lib.TokenPolicy(max_task_tokens=1 << 30)
    tasks = data_lib.tokenize_tasks(tokenizer, records, template, uncut, source)
    ids, empty = [], []
    for record, seq, start in zip(records, tasks.ids, tasks.response_start, strict=True):
        if len(seq) + (1 if eos else 0) <= room:
            ids.append(np.asarray([*lead, *seq.tolist(), *([eos_id] if eos else [])], np.int32))
        elif start < room:
            ids.append(np.asarray([*lead, *seq[:room].tolist()], np.int32))  # cut: the response did not end, no eos
        else:
            empty.append(record.id)
    if empty:
        shown = ", ".join(repr(i) for i in empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise data_lib.DataError(
            f"{source}: {len(empty)} record(s) keep no response token within train.max_tokens={max_tokens}: "
            f"ids {shown}. Raise train.max_tokens or drop them."
        )
    starts = (tasks.response_start + len(lead)).astype(np.int32)
    return Examples(ids, starts, [r.id for r in records])


@dataclasses.dataclass(frozen=True)
class Batch:
    """One optimizer step: K micro-batches of R rows x L tokens."""

    tokens: np.ndarray  # [K, R, L] int32
    positions: np.ndarray  # [K, R, L] int32: position inside its example
    segment_ids: np.ndarray  # [K, R, L] int32: example slot in the row, -1 = padding
    targets: np.ndarray  # [K, R, L] int32: the next token of the same example (0 elsewhere)
    weights: np.ndarray  # [K, R, L] float32: 1 where the position predicts a response (or eos) token

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    @property
    def response_tokens(self) -> int:
        return int(self.weights.sum())

    @property
    def num_examples(self) -> int:
        return int(((self.positions == 0) & (self.segment_ids >= 0)).sum())


def pack_micro_batch(examples: Examples, rows: Sequence[Sequence[int]], batch_rows: int, row_length: int) -> tuple:
    """Arrays [R, L] of rows of example indices (each row's examples back to back)."""
    shape = (batch_rows, row_length)
    tokens, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    segments, targets = np.full(shape, -1, np.int32), np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        offset = 0
        for slot, e in enumerate(row):
            ids, start = examples.ids[e], int(examples.response_start[e])
            n = len(ids)
            if offset + n > row_length:
                raise ValueError(f"row {r} holds {offset + n} tokens, more than row_length={row_length}")
            span = slice(offset, offset + n)
            tokens[r, span], positions[r, span], segments[r, span] = ids, np.arange(n), slot
            targets[r, offset : offset + n - 1] = ids[1:]
            # Position p predicts token p + 1: the response [start, n) is predicted by [start - 1, n - 1).
            weights[r, offset + start - 1 : offset + n - 1] = 1.0
            offset += n
    return tokens, positions, segments, targets, weights


class DataOrder:
    """The example stream: epoch e is a permutation seeded by (seed, e); it is packed step by step.

    A micro-batch takes examples from the stream in order, each into the first of its R rows with
    room (first fit), and ends at the first example that fits no row, which opens the next one.
    Everything is a function of (examples, seed, R, L, K), so a resumed run replays the same order.
    """

    def __init__(self, lengths: Sequence[int], seed: int, batch_rows: int, row_length: int, micro_batches: int):
        self.lengths = [int(n) for n in lengths]
        self.seed, self.rows, self.row_length, self.micro_batches = seed, batch_rows, row_length, micro_batches
        self.position = 0  # examples taken from the stream so far
        self._perms: dict[int, np.ndarray] = {}
        too_long = [i for i, n in enumerate(self.lengths) if n > row_length]
        if too_long:
            raise FinetuneError(f"examples {too_long[:5]} are longer than row_length={row_length}.")

    def example_at(self, position: int) -> int:
        n = len(self.lengths)
        epoch = position // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        return int(self._perms[epoch][position % n])

    def next_micro_batch(self) -> list[list[int]]:
        rows: list[list[int]] = [[] for _ in range(self.rows)]
        free = [self.row_length] * self.rows
        while True:
            e = self.example_at(self.position)
            n = self.lengths[e]
            r = next((r for r in range(self.rows) if free[r] >= n), None)
            if r is None:
                return rows
            rows[r].append(e)
            free[r] -= n
            self.position += 1

    def next_step(self) -> list[list[list[int]]]:
        return [self.next_micro_batch() for _ in range(self.micro_batches)]

    def skip(self, steps: int) -> None:
        for _ in range(steps):
            self.next_step()


def make_batch(examples: Examples, step_rows: Sequence[Sequence[Sequence[int]]], batch_rows: int, row_length: int):
    """A `Batch` from K micro-batches of rows of example indices."""
    parts = [pack_micro_batch(examples, rows, batch_rows, row_length) for rows in step_rows]
    return Batch(*(np.stack(field) for field in zip(*parts, strict=True)))


def auto_row_length(examples: Examples, multiple: int = 64) -> int:
    return max(multiple, math.ceil(int(examples.lengths.max()) / multiple) * multiple)


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


# -- checkpoints ---------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: str | pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """Complete checkpoints (trainer_state.json present) of a run directory, oldest first."""
    run_dir = pathlib.Path(run_dir)
    found = []
    for path in run_dir.glob(f"{_CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(_CHECKPOINT_PREFIX) :]
        if path.is_dir() and suffix.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(suffix), path))
    return sorted(found)


def _flatten_tree(tree) -> tuple[list[str], list[np.ndarray]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in leaves], [np.asarray(jax.device_get(x)) for _, x in leaves]


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: pathlib.Path,
    step: int,
    graphdef,
    params,
    opt_state,
    trainer_state: dict[str, Any],
    hf_config: dict,
    tokenizer_dir: pathlib.Path | None,
    with_optimizer: bool = True,
) -> pathlib.Path:
    """Writes `ckpt_<step>/` atomically: a temporary directory, fsynced, then renamed.

    The optimizer state (2x the parameters) is left out of a run's last checkpoint, which is never resumed.
    """
    final = run_dir / f"{_CHECKPOINT_PREFIX}{step:06d}"
    tmp = run_dir / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_params(nnx.merge(graphdef, jax.device_get(params)), tmp, hf_config)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
    state = {**trainer_state, "step": step}
    if with_optimizer:
        names, leaves = _flatten_tree(opt_state)
        store_lib.write_npz(tmp / "optimizer.npz", {f"leaf_{i:05d}": x for i, x in enumerate(leaves)})
        state["optimizer_leaves"] = names
    store_lib.atomic_write_bytes(tmp / "trainer_state.json", json.dumps(state, indent=1).encode())
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    return final


def load_checkpoint(path: pathlib.Path, config: ModelConfig, opt_template) -> tuple[Any, Any, dict]:
    """Parameters (float32), optimizer state (None if the checkpoint has none) and trainer state of `ckpt_<step>/`.

    Raises:
      FinetuneError: the optimizer state does not match this run's optimizer.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    params = nnx.split(load_params(path, config, dtype=jnp.float32))[1]
    if "optimizer_leaves" not in state:
        return params, None, state
    names, template = _flatten_tree(opt_template)
    if names != state["optimizer_leaves"]:
        raise FinetuneError(f"{path}: optimizer state of a different optimizer; use another run directory.")
    with np.load(path / "optimizer.npz", allow_pickle=False) as z:
        leaves = [z[f"leaf_{i:05d}"] for i in range(len(names))]
    for name, got, want in zip(names, leaves, template, strict=True):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise FinetuneError(
                f"{path}/optimizer.npz: {name} is {got.dtype}{got.shape}, expected {want.dtype}{want.shape}."
            )
    treedef = jax.tree_util.tree_structure(opt_template)
    return params, jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves]), state


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
    for stale in run_dir.glob(f".{_CHECKPOINT_PREFIX}*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
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
                    for _, old in checkpoint_dirs(run_dir)[: -config.keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
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
