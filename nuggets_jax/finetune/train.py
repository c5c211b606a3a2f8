"""Supervised fine-tuning of the Llama NNX model on a subset (golden, random or the full pool).

The examples (`finetune.data`) are `[leading special tokens] prompt ids ++ response ids [++ eos]`
with an exact response span, packed into rows and batched in a fixed data order; each optimizer
step runs the one compiled program of `finetune.step` (response-token loss, AdamW).

A run directory holds `ckpt_<step>/` checkpoints (`checkpoint`: HF layout, so
`load_model`/`load_params` read it back, plus the optimizer and trainer state), each written to a
temporary directory and renamed, and `train_log.jsonl`. A killed run resumes from its newest
checkpoint with the same data order and learning rates.
"""

from __future__ import annotations

import dataclasses
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
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nuggets_jax import data as data_lib
from nuggets_jax import sharding
from nuggets_jax import store as store_lib
from nuggets_jax.finetune.checkpoint import (
    checkpoint_dirs,
    keep_newest,
    load_checkpoint,
    remove_unfinished,
    save_checkpoint,
)
from nuggets_jax.finetune.data import Batch, DataOrder, Examples, FinetuneError, auto_row_length, make_batch
from nuggets_jax.finetune.step import TrainConfig, compiled_step, make_optimizer, state_shardings
from nuggets_jax.models.config import ModelConfig
from nuggets_jax.models.llama import Llama
from nuggets_jax.scoring import memory

_LOG_NAME = "train_log.jsonl"


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
    run_dir: pathlib.Path,
    fingerprint: dict,
    model_config: ModelConfig,
    params_template,
    opt_template,
    shardings,
    fresh: bool,
    steps: int,
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
        params, opt_state, _ = load_checkpoint(path, model_config, params_template, opt_template, shardings)
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
    """The entries of train_log.jsonl up to step `upto` (none when there is no log yet)."""
    if not path.is_file():
        return []
    entries = data_lib.read_objects(path, "the training log", error=FinetuneError)
    return [entry for _, entry in entries if entry["step"] <= upto]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A training run resolved once and validated: what every phase of `train` reads.

    Attributes:
      config: the hyperparameters (validated).
      run_dir: checkpoints and train_log.jsonl.
      mesh: the devices; `batch_rows` is a multiple of their number.
      row_length: tokens per packed row (`config.row_length`, or the smallest that holds every example).
      fingerprint: what a resume must match (config without the checkpoint fields, row length,
        examples, the caller's extra).
    """

    config: TrainConfig
    run_dir: pathlib.Path
    mesh: jax.sharding.Mesh
    row_length: int
    fingerprint: dict[str, Any]


def resolve_run(
    config: TrainConfig,
    examples: Examples,
    run_dir: str | pathlib.Path,
    mesh: jax.sharding.Mesh | None = None,
    fingerprint_extra: dict[str, Any] | None = None,
) -> RunSpec:
    """Validates the run before anything is loaded or written.

    Raises:
      FinetuneError: a bad config, a batch that does not split over the devices, or an example
        longer than the row.
    """
    config.validate()
    mesh = mesh or sharding.make_mesh()
    rows = sharding.data_size(mesh)
    if config.batch_rows % rows:
        where = f"{rows} devices" if rows == mesh.devices.size else f"mesh's {rows} data rows"
        raise FinetuneError(
            f"train.batch_rows={config.batch_rows} must be a multiple of the {where}; "
            f"use {math.ceil(config.batch_rows / rows) * rows}."
        )
    row_length = config.row_length or auto_row_length(examples)
    if int(examples.lengths.max()) > row_length:
        raise FinetuneError(
            f"the longest example has {int(examples.lengths.max())} tokens but train.row_length={row_length}; "
            "set train.row_length=0 (auto) or lower train.max_tokens."
        )
    fingerprint = {
        "config": {
            k: v
            for k, v in dataclasses.asdict(config).items()
            if k not in ("checkpoint_every", "keep_checkpoints", "fsdp", "remat")  # layout, not results
        },
        "row_length": row_length,
        "examples": examples.digest(),
        "extra": fingerprint_extra or {},
    }
    return RunSpec(config, pathlib.Path(run_dir), mesh, row_length, fingerprint)


def _starting_state(model: Llama, spec: RunSpec, fresh: bool, log) -> tuple[int, pathlib.Path | None, Any, Any, list]:
    """(step, its checkpoint, float32 params, optimizer state, train log) to start from: step 0, or
    the newest checkpoint of this run. train_log.jsonl is cut back to that step."""
    # A copy: the compiled step donates its input buffers, and the caller keeps its model.
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), nnx.split(model)[1])
    opt_state = make_optimizer(spec.config).init(params)
    shardings = state_shardings(model.config, spec.config, spec.mesh, params, opt_state)
    params, opt_state = jax.device_put((params, opt_state), shardings)
    start, checkpoint = 0, None
    restored = _restore(
        spec.run_dir, spec.fingerprint, model.config, params, opt_state, shardings, fresh, spec.config.steps
    )
    if restored is not None:
        start, checkpoint, params, opt_state = restored
        log(f"finetune: resuming {spec.run_dir} from step {start}")
    history = _read_log(spec.run_dir / _LOG_NAME, start)
    if sharding.is_main():
        text = "".join(json.dumps(x) + "\n" for x in history)
        store_lib.atomic_write_bytes(spec.run_dir / _LOG_NAME, text.encode())
    return start, checkpoint, params, opt_state, history


def _batch_putter(spec: RunSpec) -> Callable[[Batch], dict[str, jax.Array]]:
    """Puts a step's [K, R, ...] host batch on the devices, rows split over `data` (each process its rows)."""
    rows_sharding = NamedSharding(spec.mesh, PartitionSpec(None, "data"))
    local = sharding.local_slots(spec.mesh, spec.config.batch_rows)

    def put(batch: Batch) -> dict[str, jax.Array]:
        arrays = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        if jax.process_count() == 1:
            return {k: jax.device_put(v, rows_sharding) for k, v in arrays.items()}
        return {
            k: jax.make_array_from_process_local_data(rows_sharding, v[:, local], v.shape) for k, v in arrays.items()
        }

    return put


class _StepLog:
    """Records each finished step: the history, train_log.jsonl, the progress bar and `on_step` (process 0)."""

    def __init__(self, run_dir: pathlib.Path, history: list[dict], bar, on_step):
        self.run_dir, self.history, self.bar, self.on_step = run_dir, history, bar, on_step
        self.real_tokens = 0
        self.t_loop = self.t_done = time.perf_counter()

    def finish(self, step: int, batch: Batch, metrics: dict) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.real_tokens += batch.real_tokens
        now = time.perf_counter()
        elapsed = now - self.t_loop
        entry = {
            "step": step,
            **values,
            "tokens": batch.real_tokens,
            "response_tokens": batch.response_tokens,
            "examples": batch.num_examples,
            "token_slots": int(batch.tokens.size),
            "wall_s": now - self.t_done,  # since the previous step finished (steps overlap with host work)
        }
        self.t_done = now
        self.history.append(entry)
        if not math.isfinite(values["loss"]):
            raise FinetuneError(
                f"{self.run_dir}: loss became {values['loss']} at step {step}; lower train.learning_rate."
            )
        if sharding.is_main():
            with open(self.run_dir / _LOG_NAME, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(
                    loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", tok_s=f"{self.real_tokens / elapsed:.0f}"
                )
            if self.on_step is not None:
                self.on_step(step, entry)


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
    mesh = mesh or sharding.make_mesh()
    config.validate()
    config = config.resolved(
        jax.default_backend(),
        4
        * memory.param_bytes(
            model.config, jnp.float32, sharding.model_size(mesh), replicate_kv=False
        ),  # params, grads, 2 moments
        memory.device_memory(mesh.devices.flat[0]),
    )
    spec = resolve_run(config, examples, run_dir, mesh, fingerprint_extra)
    t_start = time.perf_counter()
    run_dir, row_length = spec.run_dir, spec.row_length
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_unfinished(run_dir)

    # The starting state: fresh, or the newest checkpoint of this run; and the data order from there.
    start, final_path, params, opt_state, history = _starting_state(model, spec, fresh, log)
    order = DataOrder(examples.lengths, config.seed, config.batch_rows, row_length, config.micro_batches)
    order.skip(start)
    replicated = sharding.replicated(spec.mesh)
    if start >= config.steps:
        log(f"finetune: {run_dir} already finished ({start} steps)")
        return TrainResult(params, run_dir, final_path, history, start, 0, 0.0, 0.0, 0, 0.0, row_length, _fill(history))

    # The one step program.
    t0 = time.perf_counter()
    compiled, programs = compiled_step(model.config, config, row_length, spec.mesh, params, opt_state)
    compile_s = time.perf_counter() - t0
    shardings = state_shardings(model.config, config, spec.mesh, params, opt_state)
    per_device = sharding.bytes_per_device((params, opt_state), shardings)
    mesh_shape = "x".join(str(n) for n in spec.mesh.devices.shape)
    log(
        f"finetune: {len(examples.ids)} examples, {spec.mesh.devices.size} device(s) (data x model = {mesh_shape}, "
        f"fsdp {config.fsdp}, remat {config.remat}, {config.dtype} compute; parameters and optimizer state "
        f"{memory.gib(per_device)} per device), step = {config.micro_batches} x "
        f"{config.batch_rows} rows x {row_length} tokens, steps {start}->{config.steps}, "
        f"{programs} program(s) compiled in {compile_s:.1f}s"
    )

    # The steps: each one's metrics are fetched while the next runs; checkpoints on process 0.
    graphdef_f32 = nnx.split(nnx.eval_shape(lambda: Llama(model.config, dtype=jnp.float32)))[0]
    put = _batch_putter(spec)
    bar = None
    if progress and sharding.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=run_dir.name, unit="step", dynamic_ncols=True)
    steps = _StepLog(run_dir, history, bar, on_step)
    state = (params, opt_state)
    pending: tuple[int, Batch, dict] | None = None
    last_saved = start
    try:
        for step in range(start + 1, config.steps + 1):
            batch = make_batch(examples, order.next_step(), config.batch_rows, row_length)
            normalizer = jax.device_put(np.float32(max(1, batch.response_tokens)), replicated)
            state, metrics = compiled(state, put(batch), normalizer)
            if pending is not None:
                steps.finish(*pending)
            pending = (step, batch, metrics)
            if step % config.checkpoint_every == 0 or step == config.steps:
                steps.finish(*pending)
                pending = None
                final_path = save_checkpoint(  # every process writes its own shards
                    run_dir,
                    step,
                    graphdef_f32,
                    state[0],
                    state[1],
                    {"fingerprint": spec.fingerprint, "stream_position": order.position, "row_length": row_length},
                    hf_config,
                    pathlib.Path(tokenizer_dir) if tokenizer_dir else None,
                    with_optimizer=step < config.steps,
                )
                if sharding.is_main():
                    keep_newest(run_dir, config.keep_checkpoints)
                last_saved = step
        if pending is not None:
            steps.finish(*pending)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - steps.t_loop
    steps_run = config.steps - start
    tokens_per_s = steps.real_tokens / max(wall, 1e-9)
    log(
        f"finetune: {steps_run} steps in {wall:.1f}s ({tokens_per_s:.0f} tokens/s), "
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
        tokens_per_s,
        row_length,
        _fill(history),
    )


def _fill(history: Sequence[dict]) -> float:
    slots = sum(e["token_slots"] for e in history)
    return sum(e["tokens"] for e in history) / slots if slots else 0.0
