"""Device mesh and every multi-host helper.

One global-view `jax.jit` program runs over a `Mesh` of every device of every process (axis
`data`). The candidate axis of each batch is split over it; each process supplies the rows of its
own devices (`jax.make_array_from_process_local_data`) and reads back only its own shards. The
host-side all-gathers (`gather`, `any_process`, `merge_rows`) and the process-0 check (`is_main`)
live here too, so no other module talks to `multihost_utils`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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


def make_mesh() -> Mesh:
    """1-D mesh over all devices, each process's devices contiguous (its slots of a batch are too)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), ("data",))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over `data`."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def local_slots(mesh: Mesh, global_slots: int) -> slice:
    """The rows of a [global_slots, ...] batch that this process's devices hold."""
    n_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    per_device = global_slots // mesh.devices.size
    start = jax.process_index() * n_local * per_device
    return slice(start, start + n_local * per_device)


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


def gather(array: jax.Array) -> np.ndarray:
    """The whole of a `data`-split global array on every process (all-gathered across processes)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def is_main() -> bool:
    """Whether this is process 0: the one that writes the workdir's shared files and shows progress."""
    return jax.process_index() == 0


def any_process(flags: np.ndarray) -> np.ndarray:
    """flags (bool, the same shape on every process): True where any process has True."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(flags)).any(axis=0)


def merge_rows(logp: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every process holds the rows it scored of logp [N, T] (NaN elsewhere) and correct [N, T];
    returns all of them on every process (a row from the first process that has it)."""
    if jax.process_count() == 1:
        return logp, correct
    from jax.experimental import multihost_utils

    all_logp = np.asarray(multihost_utils.process_allgather(logp))  # [P, N, T]
    all_correct = np.asarray(multihost_utils.process_allgather(correct))
    have = ~np.isnan(all_logp).all(axis=2)  # [P, N]
    owner = np.argmax(have, axis=0)
    rows = np.arange(logp.shape[0])
    return all_logp[owner, rows], all_correct[owner, rows]
