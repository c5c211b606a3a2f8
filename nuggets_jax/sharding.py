"""Device mesh, the parameter sharding table and every multi-host helper.

One global-view `jax.jit` program runs over a 2-D `Mesh` of every device of every process, axes
`("data", "model")`. The candidate axis of each batch is split over `data`; each process supplies
the rows of its own devices (`jax.make_array_from_process_local_data`) and reads back only its
own shards. The parameters are split over `model` in the Megatron layout by one table of named
rules (`PARAM_RULES`); `model=1` is pure data parallelism. The host-side collectives (`gather`,
`any_process`, `merge_rows`) and the process-0 check (`is_main`) live here too, so no other module
talks to `multihost_utils`; every byte they move across processes is counted in `TRAFFIC`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nuggets_jax.errors import UserError

P = PartitionSpec
AXES = ("data", "model")


class ShardingError(UserError):
    """A mesh the devices cannot form, or a model that cannot fit at the chosen degree."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How to join a multi-process run. `coordinator=None` and `num_processes=None` mean automatic
    (TPU pods, SLURM) when `enabled`, else a single process."""

    enabled: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def initialize(config: DistributedConfig) -> None:
    """Calls `jax.distributed.initialize` once, before anything touches the devices."""
    if not config.enabled or jax.distributed.is_initialized():
        return
    # CPU processes talk through gloo collectives; the setting does nothing for accelerators. It must
    # be set before the backend starts, so do not ask jax.default_backend() here.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_cpu_devices(count: int) -> bool:
    """Splits the host into `count` XLA:CPU devices; False (nothing changed) once the backend has
    started, e.g. a second job in one process. The setting does nothing for GPUs and TPUs."""
    try:
        jax.config.update("jax_num_cpu_devices", max(1, count))
    except RuntimeError:  # JAX refuses the setting once a backend is up
        return False
    return True


def make_mesh(model: int = 1) -> Mesh:
    """The (data, model) mesh over all devices, each process's devices contiguous.

    A process's devices form whole rows of the mesh (`model` consecutive devices each), so the
    model-parallel collectives stay inside a host and a process's candidate slots are contiguous.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    local = jax.local_device_count()
    if model < 1 or local % model:
        raise ShardingError(
            f"mesh.model={model} does not divide this process's {local} device(s); choose a divisor of "
            f"{local} (1 = data parallel only, 0 = the smallest degree the model fits at)."
        )
    return Mesh(np.asarray(devices).reshape(-1, model), AXES)


def data_size(mesh: Mesh) -> int:
    return mesh.shape["data"]


def model_size(mesh: Mesh) -> int:
    return mesh.shape.get("model", 1)


# -- the sharding table --------------------------------------------------------------------------
# Megatron tensor parallelism over `model`: the projections into heads and into the MLP width are
# split on their output axis, the projections back on their input axis (one all-reduce after
# each), the embedding and the LM head over the vocabulary. Specs are of the stacked arrays
# ([N layers, in, out] for the layers). A group is split only where its widths divide by the degree
# (`ShardPlan.of`); otherwise its parameters stay whole on every device of a `model` row.
PARAM_RULES: dict[str, tuple[str, PartitionSpec]] = {
    "embed": ("vocabulary", P("model", None)),
    "lm_head": ("vocabulary", P(None, "model")),
    "q_proj": ("attention", P(None, None, "model")),
    "k_proj": ("attention", P(None, None, "model")),
    "v_proj": ("attention", P(None, None, "model")),
    "q_bias": ("attention", P(None, "model")),
    "k_bias": ("attention", P(None, "model")),
    "v_bias": ("attention", P(None, "model")),
    "o_proj": ("attention", P(None, "model", None)),
    "gate_proj": ("mlp", P(None, None, "model")),
    "up_proj": ("mlp", P(None, None, "model")),
    "gate_bias": ("mlp", P(None, "model")),
    "up_bias": ("mlp", P(None, "model")),
    "down_proj": ("mlp", P(None, "model", None)),
}  # every other parameter (norms, o/down biases) is replicated
# Prefix K/V [N, C, P, K, Dh]: candidates over `data`, KV heads over `model` with the attention.
CACHE_RULE = ("attention", P(None, "data", None, "model", None))


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which parameter groups a model-parallel degree splits, and why the others stay whole."""

    degree: int
    split: frozenset[str]
    whole: Mapping[str, str]  # group -> reason

    @classmethod
    def of(cls, config, degree: int) -> ShardPlan:
        """The plan for a `ModelConfig` at `degree`: a group is split when every width it splits divides."""
        widths = {
            "attention": {"query heads": config.num_heads, "KV heads": config.num_kv_heads},
            "mlp": {"MLP width": config.intermediate_size},
            "vocabulary": {"vocabulary": config.vocab_size},
        }
        split, whole = set(), {}
        for group, named in widths.items():
            bad = [f"{name} {n}" for name, n in named.items() if n % degree]
            if degree == 1:
                continue
            if bad:
                whole[group] = f"{', '.join(bad)} not divisible by {degree}"
            else:
                split.add(group)
        return cls(degree, frozenset(split), whole)

    def spec(self, name: str) -> PartitionSpec:
        """The PartitionSpec of parameter `name` (an attribute name of the model)."""
        group, spec = PARAM_RULES.get(name, (None, P()))
        return spec if group in self.split else P()

    def cache_spec(self) -> PartitionSpec:
        group, spec = CACHE_RULE
        return spec if group in self.split else P(None, "data")

    @property
    def vocab_shards(self) -> int:
        return self.degree if "vocabulary" in self.split else 1

    def describe(self) -> str:
        if self.degree == 1:
            return "model parallel 1: every device holds the whole model"
        parts = [f"{g} split" for g in ("attention", "mlp", "vocabulary") if g in self.split]
        parts += [f"{g} whole on each device ({why})" for g, why in self.whole.items()]
        return f"model parallel {self.degree}: " + "; ".join(parts)


def kv_replicas(config, degree: int) -> int:
    """How many copies of each KV head let the attention split at `degree` when the KV heads alone do
    not divide it (Megatron's and maxtext's rule): degree / KV heads, when that is whole and the
    query heads divide by the degree; 1 otherwise."""
    k, h = config.num_kv_heads, config.num_heads
    if degree <= 1 or k % degree == 0 or degree % k or h % degree:
        return 1
    return degree // k


def scoring_config(config, degree: int):
    """The model config the scoring job runs at model-parallel `degree`: KV heads replicated
    (`kv_replicas`) where that lets the attention split; the same function of the inputs."""
    r = kv_replicas(config, degree)
    return config if r == 1 else dataclasses.replace(config, num_kv_heads=config.num_kv_heads * r)


def _leaf_name(path) -> str:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    keys = [k for k in keys if k not in ("value", "raw_value")]
    return keys[-1]


def param_shardings(mesh: Mesh, plan: ShardPlan, state):
    """The NamedSharding of every parameter of an nnx state (same tree structure)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: NamedSharding(mesh, plan.spec(_leaf_name(path))), state)


def train_spec(plan: ShardPlan, path, shape: tuple[int, ...], data: int, fsdp: bool) -> PartitionSpec:
    """The spec of a training-state array (a parameter, its gradient or an optimizer moment): the
    table's `model` split, and with `fsdp` the largest other axis that `data` divides split over
    `data` (never the stacked-layer axis, which `lax.scan` walks). Scalars are replicated."""
    if not shape:
        return P()
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    spec = [*plan.spec(_leaf_name(path)), *[None] * len(shape)][: len(shape)]
    if fsdp and data > 1:
        first = 1 if "layers" in names and len(shape) > 1 else 0
        free = [i for i in range(first, len(shape)) if spec[i] is None and shape[i] % data == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "data"
    return P(*spec)


def train_shardings(mesh: Mesh, plan: ShardPlan, tree, fsdp: bool):
    """NamedShardings of a training-state tree (params, gradients or an optax state): `train_spec`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, train_spec(plan, path, tuple(np.shape(x)), data_size(mesh), fsdp)), tree
    )


def bytes_per_device(state, shardings) -> int:
    """Bytes of the largest-holding device for arrays (or ShapeDtypeStructs) laid out by `shardings`."""
    total = 0
    for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        total += int(np.prod(s.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
    return total


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over `data` (and replicated over `model`)."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def local_slots(mesh: Mesh, global_slots: int) -> slice:
    """The rows of a [global_slots, ...] batch that this process's devices hold."""
    grid = mesh.devices.reshape(data_size(mesh), -1)  # a 1-D ("data",) mesh is one column
    rows = [i for i, row in enumerate(grid) if row[0].process_index == jax.process_index()]
    per_row = global_slots // data_size(mesh)
    return slice(rows[0] * per_row, (rows[-1] + 1) * per_row)


def put_local(mesh: Mesh, local: np.ndarray, global_shape: tuple[int, ...]) -> jax.Array:
    """A global [global_slots, ...] array split on `data`, from this process's rows."""
    return jax.make_array_from_process_local_data(data_sharding(mesh), local, global_shape)


def get_local(array: jax.Array) -> np.ndarray:
    """This process's rows of a `data`-split global array, in order (blocks until ready)."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:  # replicated copies of a shard on several local devices
            seen.add(start)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts, axis=0)


# Bytes each host-side collective delivered to this process, by purpose (tests read it).
TRAFFIC: collections.Counter = collections.Counter()


def _allgather(x: np.ndarray, purpose: str, tiled: bool = False) -> np.ndarray:
    from jax.experimental import multihost_utils

    out = np.asarray(multihost_utils.process_allgather(x, tiled=tiled))
    TRAFFIC[purpose] += out.nbytes
    return out


def gather(array: jax.Array) -> np.ndarray:
    """The whole of a `data`-split global array on every process (all-gathered across processes)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    return _allgather(array, "gather", tiled=True)


def is_main() -> bool:
    """Whether this is process 0: the one that writes the workdir's shared files and shows progress."""
    return jax.process_index() == 0


def any_process(flags: np.ndarray) -> np.ndarray:
    """flags (bool, the same shape on every process): True where any process has True."""
    if jax.process_count() == 1:
        return flags
    return _allgather(flags, "any_process").any(axis=0)


def merge_rows(logp: np.ndarray, correct: np.ndarray, slice_bytes: int = 64 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Every process holds the rows it scored of logp [N, T] (NaN elsewhere) and correct [N, T];
    returns all of them on every process (a row from the first process that has it).

    Only the rows a process holds travel, in slices of about `slice_bytes` per process, so each
    process receives every row about once (padding to the busiest process aside), never P copies of
    the [N, T] arrays.
    """
    if jax.process_count() == 1:
        return logp, correct
    owned = np.flatnonzero(~np.isnan(logp).all(axis=1))
    counts = _allgather(np.asarray([owned.size], np.int64), "merge_counts")[:, 0]  # [P]
    row_bytes = max(1, logp.shape[1] * (logp.itemsize + correct.itemsize))
    step = max(1, slice_bytes // row_bytes)
    out_logp, out_correct = np.full_like(logp, np.nan), np.zeros_like(correct)
    for start in range(0, int(counts.max()), step):
        mine = owned[start : start + step]
        width = int(min(step, counts.max() - start))
        rows = np.full(width, -1, np.int64)
        rows[: mine.size] = mine
        all_rows = _allgather(rows, "merge_rows")  # [P, width]
        all_logp = _allgather(np.ascontiguousarray(logp[np.maximum(rows, 0)]), "merge_rows")
        all_correct = _allgather(np.ascontiguousarray(correct[np.maximum(rows, 0)]), "merge_rows")
        for p in reversed(range(all_rows.shape[0])):  # the first process's copy written last wins
            used = all_rows[p] >= 0
            out_logp[all_rows[p, used]] = all_logp[p, used]
            out_correct[all_rows[p, used]] = all_correct[p, used]
    return out_logp, out_correct
