"""Memory per device of model-parallel scoring and of training: `python -m benchmarks.memory_table
[--training] [--out FILE]`.

For each model and layout, with the project's own code on abstract shapes (no weights, no
downloads), on a mesh of fake CPU devices:

Scoring (the default), per model-parallel degree:

- parameters per device: `scoring.memory.param_bytes` under the sharding table (bfloat16), with
  the KV heads replicated up to the degree as the scoring job does (`sharding.scoring_config`);
- the scoring program per device: an `Engine` built from the abstract model (`nnx.eval_shape`) on
  a fake-CPU mesh of data x degree devices, with the accelerator's engine knobs (16,384 task
  tokens per device per call, the whole vocabulary per LM-head tile, whole task windows), compiled
  for a synthetic task set shaped like the paper's (100 tasks, about 200 tokens each) and prefix
  buckets up to 512 tokens; `Engine.program_bytes` is XLA's memory analysis of the largest
  program (arguments, the parameters included, + outputs + temporaries - aliased);
- which chips it fits: program <= `memory.PROGRAM_SHARE` x the chip's memory, and per model and
  chip the smallest degree that fits.

Training (`--training`), per (data = FSDP) x (model = tensor parallel) layout:

- float32 parameters, AdamW moments and gradient accumulator per device under the training layout
  (`finetune.step.state_shardings`; KV heads are not replicated: the attention stays whole where
  they do not divide the degree);
- the compiled train step (`finetune.step.compiled_step` on ShapeDtypeStructs: one row of
  `--row_length` tokens per data shard, one micro-batch, remat "full", bfloat16 compute) and its
  XLA memory analysis; activations and temporaries = the program - parameters - optimizer state -
  gradients. Layouts whose state alone exceeds COMPILE_FACTOR x the largest chip are not compiled;
- which chips each layout fits and, per model and chip, the fewest devices that fit.

The table is markdown on stdout (and in `--out`). Small runs:

    python -m benchmarks.memory_table --models llama-7b --degrees 1 2
    python -m benchmarks.memory_table --training --models llama-3.2-1b --data_degrees 1 8 --degrees 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.common import machine_info, set_xla_flags, write_json

# From the models' published config.json files (bfloat16 checkpoints).
MODELS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "llama-3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "llama-3-70b": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "qwen2-72b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
        max_position_embeddings=32768,
    ),
    "llama-7b": dict(  # the paper's model
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=2048,
    ),
}  # fmt: skip
MODEL_NAMES = {
    "llama-3.2-1b": "Llama-3.2-1B",
    "llama-3-8b": "Llama-3-8B",
    "llama-3-70b": "Llama-3-70B",
    "qwen2-72b": "Qwen2-72B",
    "llama-7b": "LLaMA-7B (paper)",
}
# Memory per chip as the vendors state it: TPUs in GiB, GPUs in GB (10^9 bytes).
CHIPS: dict[str, int] = {
    "TPU v5e": 16 * 2**30,
    "TPU v6e": 32 * 2**30,
    "TPU v5p": 95 * 2**30,
    "H100": 80 * 10**9,
    "H200": 141 * 10**9,
}
DEGREES = (1, 2, 4, 8, 16)
SCORING_DEVICES = 16  # fake CPU devices of a scoring run: data 2 up to degree 8, data 1 at 16
# Training: data (FSDP) x model (tensor parallel) layouts of at most TRAINING_DEVICES fake devices.
TRAINING_MODELS = ("llama-3.2-1b", "llama-3-8b", "llama-3-70b")
TRAINING_DATA_DEGREES = (1, 8, 16, 32, 64, 128, 256)
TRAINING_MODEL_DEGREES = (1, 2, 4, 8)
TRAINING_DEVICES = 256
TRAINING_ROW_LENGTH = 2048
# A layout is compiled only when its float32 state (params + AdamW moments + gradients) is within
# this factor of the largest chip: beyond it no chip can hold it whatever the activations.
COMPILE_FACTOR = 1.5
# XLA:CPU runs bfloat16 dots in float32: it converts the stacked bf16 layer weights, and loop-invariant
# code motion hoists that convert out of the layer scan, a float32 copy of every layer's weights that
# no GPU or TPU program holds. Without the pass the convert stays per layer (one layer's copy).
XLA_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
# The paper's task set: 100 tasks of about 200 tokens (prompt + response), responses about half.
NUM_TASKS = 100
MEAN_TASK_TOKENS = 200
MAX_TASK_TOKENS = 512
NUM_PREFIXES = 2000
MAX_PREFIX_TOKENS = 512


def model_config(name: str):
    from nuggets_jax.models.config import ModelConfig

    return ModelConfig(**MODELS[name])


def synthetic_tasks(vocab_size: int, seed: int = 0):
    """`TokenizedTasks` of random ids with the paper's lengths (gamma, mean ~200, cut at 512)."""
    from nuggets_jax import data

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.gamma(4.0, MEAN_TASK_TOKENS / 4.0, NUM_TASKS).round().astype(int), 24, MAX_TASK_TOKENS)
    response_start = (lengths * rng.uniform(0.3, 0.6, NUM_TASKS)).astype(int)
    return data.TokenizedTasks(
        ids=[rng.integers(0, vocab_size, n, dtype=np.int32) for n in lengths],
        response_start=response_start,
        n_tokens=lengths - response_start,
        cut=lengths >= MAX_TASK_TOKENS,
    )


def synthetic_prefix_lengths(seed: int = 0) -> list[int]:
    """Candidate prefix lengths (gamma, mean ~100) with the longest at the 512-token cut."""
    rng = np.random.default_rng(seed + 1)
    lengths = np.clip(rng.gamma(2.0, 50.0, NUM_PREFIXES).round().astype(int), 8, MAX_PREFIX_TOKENS)
    return [*lengths.tolist(), MAX_PREFIX_TOKENS]


def accelerator_engine_config(vocab_size: int):
    """The GPU/TPU defaults of `EngineConfig.for_platform`, spelled out so a CPU mesh compiles them."""
    from nuggets_jax.scoring import engine

    accel = 1  # index of the accelerator value in the engine's (CPU, accelerator) defaults
    tile = engine.AUTO_LM_HEAD_VOCAB_TILE[accel] or vocab_size  # 0 = whole vocabulary; CPU would read 0 as 1024
    return engine.EngineConfig(
        candidates_per_device=1,
        tokens_per_device=engine.AUTO_TOKENS_PER_DEVICE[accel],
        lm_head_tokens=engine.AUTO_LM_HEAD_TOKENS[accel],
        lm_head_vocab_tile=tile,
        attention_queries=engine.AUTO_ATTENTION_QUERIES[accel],
        attention_block=engine.AUTO_ATTENTION_BLOCK[accel],
    )


def cpu_mesh(data: int, degree: int):
    """A (data, model) mesh of the first data x degree fake CPU devices."""
    import jax

    from nuggets_jax import sharding

    devices = jax.devices()[: data * degree]
    if len(devices) < data * degree:
        raise SystemExit(
            f"degree {degree} x data {data} needs {data * degree} devices, jax has {jax.device_count()}: "
            "set JAX_NUM_CPU_DEVICES before jax starts"
        )
    return jax.sharding.Mesh(np.asarray(devices).reshape(data, degree), sharding.AXES)


def layer_f32_bytes(config, degree: int, replicate_kv: bool) -> int:
    """One decoder layer's weights per device in float32 at model-parallel `degree` (XLA:CPU's copy of
    the layer it runs; FSDP does not shrink it, the layer is gathered over `data` where it runs)."""
    import jax.numpy as jnp

    from nuggets_jax.scoring import memory

    one, two = (
        memory.param_bytes(dataclasses.replace(config, num_layers=n), jnp.float32, degree, replicate_kv) for n in (1, 2)
    )
    return two - one


@dataclasses.dataclass
class Row:
    """One model at one degree."""

    model: str
    degree: int
    data: int
    plan: str
    param_bytes: int  # memory.param_bytes
    engine_param_bytes: int  # what the engine's shardings hold (the same table, checked)
    program_bytes: int  # the largest compiled program, parameters included
    layer_f32_bytes: int  # one layer's weights per device in float32 (XLA:CPU's copy; no accelerator holds it)
    row_shape: tuple[int, int]  # [rows per group, row length]
    buckets: list[int]
    programs: int
    compile_s: float
    fits: dict[str, bool]

    @property
    def rest_bytes(self) -> int:
        return self.program_bytes - self.param_bytes


def measure(name: str, degree: int, data: int) -> Row:
    """Parameters and the largest scoring program per device for `name` at `degree`."""
    import jax.numpy as jnp
    from flax import nnx

    from nuggets_jax import sharding
    from nuggets_jax.models.llama import Llama
    from nuggets_jax.scoring import Engine, memory

    config = model_config(name)
    # As the scoring job loads it: KV heads replicated where that lets the attention split.
    model = nnx.eval_shape(lambda: Llama(sharding.scoring_config(config, degree), dtype=jnp.bfloat16))
    engine = Engine(
        model,
        synthetic_tasks(config.vocab_size),
        synthetic_prefix_lengths(),
        accelerator_engine_config(config.vocab_size),
        mesh=cpu_mesh(data, degree),
        log=lambda _: None,
    )
    params = memory.param_bytes(config, jnp.bfloat16, degree)
    program = int(engine.program_bytes)
    return Row(
        model=name,
        degree=degree,
        data=data,
        plan=engine.plan.describe(),
        param_bytes=params,
        engine_param_bytes=int(engine.param_bytes_per_device),
        program_bytes=program,
        layer_f32_bytes=layer_f32_bytes(config, degree, replicate_kv=True),
        row_shape=tuple(engine.layout.groups[0].tokens.shape),
        buckets=list(engine.buckets),
        programs=engine.programs,
        compile_s=engine.compile_s,
        fits={chip: program <= memory.PROGRAM_SHARE * limit for chip, limit in CHIPS.items()},
    )


def smallest_fitting(rows: Sequence[Row]) -> dict[str, dict[str, int | None]]:
    """model -> chip -> the smallest measured degree whose program fits (None: none does)."""
    out: dict[str, dict[str, int | None]] = {}
    for model in dict.fromkeys(r.model for r in rows):
        mine = sorted((r for r in rows if r.model == model), key=lambda r: r.degree)
        out[model] = {chip: next((r.degree for r in mine if r.fits[chip]), None) for chip in CHIPS}
    return out


def parameter_rule_degrees(models: Sequence[str], degrees: Sequence[int]) -> dict[str, dict[str, int | None]]:
    """model -> chip -> what `mesh.model=0` picks (`memory.fit_degree`: parameters <= PARAM_SHARE)."""
    import jax.numpy as jnp

    from nuggets_jax import sharding
    from nuggets_jax.scoring import memory

    out: dict[str, dict[str, int | None]] = {}
    for model in models:
        out[model] = {}
        for chip, limit in CHIPS.items():
            try:
                out[model][chip] = memory.fit_degree(model_config(model), jnp.bfloat16, limit, max(degrees))
            except sharding.ShardingError:
                out[model][chip] = None
    return out


@dataclasses.dataclass
class TrainRow:
    """One model at one (data, model) training layout; the program fields are None when not compiled."""

    model: str
    data: int
    degree: int
    fsdp: bool
    plan: str
    batch_rows: int
    row_length: int
    param_bytes: int  # float32 master weights
    opt_bytes: int  # AdamW mu + nu (+ its scalars), float32
    grad_bytes: int  # the gradient accumulator, float32, laid out as the parameters
    layer_f32_bytes: int  # one layer gathered over `data`, float32 (what XLA:CPU converts per layer)
    program_bytes: int | None  # the compiled step: arguments + outputs + temporaries - aliased
    memory_stats: dict[str, int] | None  # XLA's argument/output/temp/alias sizes
    compile_s: float
    fits: dict[str, bool]

    @property
    def devices(self) -> int:
        return self.data * self.degree

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.opt_bytes + self.grad_bytes

    @property
    def activation_bytes(self) -> int | None:
        """Everything else the step holds: activations, the bf16 copy of the weights, gathered layers,
        updates, the batch."""
        return None if self.program_bytes is None else self.program_bytes - self.state_bytes


def training_config(data: int, row_length: int):
    """The fine-tuning config of a layout: one row per data shard, one micro-batch, FSDP over data > 1,
    every decoder layer rematerialised, bfloat16 compute (the GPU/TPU defaults, resolved for "tpu")."""
    from nuggets_jax.finetune import TrainConfig

    return TrainConfig(
        batch_rows=data, micro_batches=1, row_length=row_length, fsdp="on" if data > 1 else "off", remat="full",
        dtype="bfloat16",
    ).resolved("tpu")  # fmt: skip


def measure_training(name: str, data: int, degree: int, row_length: int, compile_limit: float) -> TrainRow:
    """Training state per device for `name` on a data x degree mesh, and the compiled step's memory
    when the state is at most `compile_limit` bytes per device."""
    import jax
    import jax.numpy as jnp

    from nuggets_jax import sharding
    from nuggets_jax.finetune import step
    from nuggets_jax.scoring import memory

    config = model_config(name)  # training keeps the KV heads as they are
    train = training_config(data, row_length)
    mesh = cpu_mesh(data, degree)
    params = memory.abstract_state(config, jnp.float32)
    opt_state = jax.eval_shape(step.make_optimizer(train).init, params)
    param_layout, opt_layout = step.state_shardings(config, train, mesh, params, opt_state)
    param_bytes = sharding.bytes_per_device(params, param_layout)
    table_bytes = memory.param_bytes(config, jnp.float32, degree, replicate_kv=False)
    if data == 1 and param_bytes != table_bytes:
        raise SystemExit(
            f"{name} degree {degree}: the training layout holds {param_bytes} parameter bytes per device, "
            f"memory.param_bytes says {table_bytes}: the two disagree about the sharding table"
        )
    row = TrainRow(
        model=name,
        data=data,
        degree=degree,
        fsdp=train.fsdp == "on",
        plan=sharding.ShardPlan.of(config, degree).describe(),
        batch_rows=train.batch_rows,
        row_length=row_length,
        param_bytes=param_bytes,
        opt_bytes=sharding.bytes_per_device(opt_state, opt_layout),
        grad_bytes=param_bytes,
        layer_f32_bytes=layer_f32_bytes(config, degree, replicate_kv=False),
        program_bytes=None,
        memory_stats=None,
        compile_s=0.0,
        fits={},
    )
    if row.state_bytes <= compile_limit:
        start = time.perf_counter()
        compiled, _ = step.compiled_step(config, train, row_length, mesh, params, opt_state)
        row.compile_s = time.perf_counter() - start
        row.program_bytes = memory.program_bytes(compiled)
        stats = compiled.memory_analysis()
        row.memory_stats = {
            k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")
        }
    total = row.state_bytes if row.program_bytes is None else row.program_bytes
    row.fits = {chip: total <= memory.PROGRAM_SHARE * limit for chip, limit in CHIPS.items()}
    return row


def training_layouts(data_degrees: Sequence[int], degrees: Sequence[int], devices: int) -> list[tuple[int, int]]:
    """(data, degree) pairs of at most `devices` devices, fewest devices first."""
    pairs = [(d, m) for d in data_degrees for m in degrees if d * m <= devices]
    return sorted(pairs, key=lambda p: (p[0] * p[1], p[1]))


def fewest_devices(rows: Sequence[TrainRow]) -> dict[str, dict[str, TrainRow | None]]:
    """model -> chip -> the fitting layout with the fewest devices (then the smallest program)."""
    out: dict[str, dict[str, TrainRow | None]] = {}
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        out[model] = {
            chip: min((r for r in mine if r.fits[chip]), key=lambda r: (r.devices, r.program_bytes), default=None)
            for chip in CHIPS
        }
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _degree(d: int | None) -> str:
    return "-" if d is None else str(d)


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(values) + " |"

    return [line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows)]


def markdown(rows: Sequence[Row], picks: dict[str, dict[str, int | None]], notes: Sequence[str]) -> str:
    """The tables of BENCHMARKS.md ("Memory per device"): rows model x degree, then per model and chip."""
    from nuggets_jax.scoring import memory

    chips = list(CHIPS)
    headers = [
        "model",
        "degree",
        "mesh data x model",
        "params/device (GiB)",
        "program/device (GiB)",
        "program - params (GiB)",
        "CPU-only f32 layer (GiB)",
        *[f"fits {c}" for c in chips],
    ]
    cells = [
        [
            MODEL_NAMES[r.model],
            str(r.degree),
            f"{r.data}x{r.degree}",
            _gib(r.param_bytes),
            _gib(r.program_bytes),
            _gib(r.rest_bytes),
            _gib(r.layer_f32_bytes),
            *["yes" if r.fits[c] else "no" for c in chips],
        ]
        for r in rows
    ]
    lines = _markdown_table(headers, cells)
    lines += [
        "",
        f"Smallest degree whose program fits (program <= {memory.PROGRAM_SHARE:.0%} of the chip's memory), and after "
        f"the slash the degree `mesh.model=0` picks (parameters <= {memory.PARAM_SHARE:.0%}); - = none measured fits:",
        "",
    ]
    best = smallest_fitting(rows)
    lines += _markdown_table(
        ["model", *[f"{c} ({_gib(CHIPS[c])} GiB)" for c in chips]],
        [[MODEL_NAMES[m], *[f"{_degree(best[m][c])} / {_degree(picks[m][c])}" for c in chips]] for m in best],
    )
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def training_markdown(rows: Sequence[TrainRow], notes: Sequence[str]) -> str:
    """The tables of BENCHMARKS.md ("Training memory per device"): rows model x layout, then per model
    and chip the fewest devices that fit."""
    from nuggets_jax.scoring import memory

    chips = list(CHIPS)
    headers = [
        "model",
        "data x model",
        "devices",
        "params (GiB)",
        "AdamW mu+nu (GiB)",
        "grads (GiB)",
        "activations + temps (GiB)",
        "total/device (GiB)",
        "CPU-only f32 layer (GiB)",
        *[f"fits {c}" for c in chips],
    ]
    cells = [
        [
            MODEL_NAMES[r.model],
            f"{r.data}x{r.degree}",
            str(r.devices),
            _gib(r.param_bytes),
            _gib(r.opt_bytes),
            _gib(r.grad_bytes),
            "not compiled" if r.activation_bytes is None else _gib(r.activation_bytes),
            _gib(r.state_bytes) + "+" if r.program_bytes is None else _gib(r.program_bytes),
            _gib(r.layer_f32_bytes),
            *["yes" if r.fits[c] else "no" for c in chips],
        ]
        for r in rows
    ]
    lines = _markdown_table(headers, cells)
    lines += [
        "",
        f"Fewest devices whose train step fits (total <= {memory.PROGRAM_SHARE:.0%} of the chip's memory), as "
        "devices (data x model, total GiB per device); - = no measured layout fits:",
        "",
    ]
    best = fewest_devices(rows)

    def cell(r: TrainRow | None) -> str:
        return "-" if r is None else f"{r.devices} ({r.data}x{r.degree}, {_gib(r.program_bytes)})"

    lines += _markdown_table(
        ["model", *[f"{c} ({_gib(CHIPS[c])} GiB)" for c in chips]],
        [[MODEL_NAMES[m], *[cell(best[m][c]) for c in chips]] for m in best],
    )
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def run_scoring(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The scoring table: one engine per model and degree."""
    import jax

    start = time.perf_counter()
    rows = []
    for name in args.models:
        for degree in args.degrees:
            data = args.data if args.data * degree <= jax.device_count() else 1
            row = measure(name, degree, data)
            print(
                f"{MODEL_NAMES[name]} degree {degree} (mesh {data}x{degree}): params {_gib(row.param_bytes)} GiB, "
                f"program {_gib(row.program_bytes)} GiB, rows {row.row_shape[0]}x{row.row_shape[1]}, buckets "
                f"{row.buckets}, {row.programs} programs compiled in {row.compile_s:.1f}s; {row.plan}",
                flush=True,
            )
            if row.engine_param_bytes != row.param_bytes:
                raise SystemExit(
                    f"{name} degree {degree}: memory.param_bytes says {row.param_bytes} bytes per device, the "
                    f"engine's shardings hold {row.engine_param_bytes}: the two disagree about the sharding table"
                )
            rows.append(row)
    wall_s = time.perf_counter() - start
    tasks = synthetic_tasks(32000)
    lengths = [len(t) for t in tasks.ids]
    notes = [
        f"Tasks: {NUM_TASKS} synthetic tasks of random ids, mean {np.mean(lengths):.0f} tokens (max {max(lengths)}), "
        f"{int(np.sum(tasks.n_tokens))} scored; prefix buckets up to {MAX_PREFIX_TOKENS} tokens; one candidate per "
        "device per call; engine knobs of the accelerators (tokens_per_device 16384, the whole vocabulary per "
        "LM-head tile, whole task windows), bfloat16 parameters; KV heads replicated up to the degree where that "
        "lets the attention split (`sharding.scoring_config`).",
        "program = XLA:CPU's memory analysis of the largest compiled program (arguments incl. the parameters + "
        "outputs + temporaries - aliased); program - params = prefix K/V cache, row inputs and activations.",
        f"{len(rows)} engines compiled in {wall_s:.0f} s on {jax.device_count()} fake CPU devices, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}.",
    ]
    text = markdown(rows, parameter_rule_degrees(args.models, args.degrees), notes)
    return text, {"rows": [dataclasses.asdict(r) for r in rows], "chips": CHIPS, "wall_s": wall_s}


def run_training(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The training table: one train step per model and layout whose state is within COMPILE_FACTOR of a chip."""
    import jax

    compile_limit = COMPILE_FACTOR * max(CHIPS.values())
    layouts = training_layouts(args.data_degrees, args.degrees, jax.device_count())
    start = time.perf_counter()
    rows = []
    for name in args.models:
        for data, degree in layouts:
            row = measure_training(name, data, degree, args.row_length, compile_limit)
            program = (
                "not compiled"
                if row.program_bytes is None
                else f"program {_gib(row.program_bytes)} GiB, compiled in {row.compile_s:.1f}s"
            )
            print(
                f"{MODEL_NAMES[name]} {data}x{degree}: state {_gib(row.state_bytes)} GiB (params "
                f"{_gib(row.param_bytes)}, opt {_gib(row.opt_bytes)}), {program}; {row.plan}",
                flush=True,
            )
            rows.append(row)
    wall_s = time.perf_counter() - start
    compiled = [r for r in rows if r.program_bytes is not None]
    skipped = sorted({d * m for d in args.data_degrees for m in args.degrees if d * m > jax.device_count()})
    notes = [
        f"Step: {args.row_length} tokens per row, batch_rows = data (one row per data shard, so {args.row_length} "
        "tokens per device), micro_batches 1, remat full, bfloat16 compute, float32 parameters, AdamW moments and "
        "gradient accumulator; FSDP on for data > 1 (`sharding.train_spec`), the sharding table on `model`, KV "
        "heads not replicated.",
        "total = XLA:CPU's memory analysis of the compiled train step (arguments + outputs + temporaries - "
        "aliased; the state is donated); activations + temps = total - params - AdamW - grads. A total with + "
        f"is the state alone: layouts whose state exceeds {COMPILE_FACTOR} x the largest chip were not compiled.",
        f"{len(rows)} layouts, {len(compiled)} train steps compiled in {wall_s:.0f} s "
        f"({sum(r.compile_s for r in compiled):.0f} s compiling) on {jax.device_count()} fake CPU devices, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        + (f"; layouts of {', '.join(map(str, skipped))} devices not measured." if skipped else "."),
    ]
    text = training_markdown(rows, notes)
    return text, {
        "rows": [{**dataclasses.asdict(r), "activation_bytes": r.activation_bytes} for r in rows],
        "chips": CHIPS,
        "wall_s": wall_s,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m benchmarks.memory_table [--training] [--models ...] [--degrees ...] [--out FILE] [--json FILE]`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training", action="store_true", help="the training table (FSDP x tensor parallel)")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="default: per table")
    parser.add_argument("--degrees", nargs="+", type=int, default=None, help="model-parallel degrees")
    parser.add_argument("--data", type=int, default=2, help="scoring: mesh data size where the devices allow")
    parser.add_argument("--data_degrees", nargs="+", type=int, default=list(TRAINING_DATA_DEGREES), help="training")
    parser.add_argument("--row_length", type=int, default=TRAINING_ROW_LENGTH, help="training: tokens per row")
    parser.add_argument("--xla_flags", default=XLA_FLAGS, help="appended to XLA_FLAGS before jax starts")
    parser.add_argument("--out", default=None, help="write the markdown here too")
    parser.add_argument("--json", default=None, help="write every number (and the machine) as JSON here")
    args = parser.parse_args(argv)
    if args.training:
        args.models = args.models or list(TRAINING_MODELS)
        args.degrees = args.degrees or list(TRAINING_MODEL_DEGREES)
        devices = min(TRAINING_DEVICES, max(d * m for d in args.data_degrees for m in args.degrees))
    else:
        args.models = args.models or list(MODELS)
        args.degrees = args.degrees or list(DEGREES)
        devices = max(SCORING_DEVICES, *args.degrees)
    set_xla_flags(args.xla_flags)
    # The fake-CPU mesh needs its devices before jax starts (a JAX_NUM_CPU_DEVICES already set is kept).
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(devices))
    text, result = run_training(args) if args.training else run_scoring(args)
    print()
    print(text, end="")
    if args.out:
        pathlib.Path(args.out).write_text(text, encoding="utf-8")
    if args.json:
        write_json(args.json, {**result, "machine": machine_info()})
    return result


if __name__ == "__main__":
    main()
