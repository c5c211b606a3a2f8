"""Device mesh and multi-host plumbing.

One global-view `jax.jit` program runs over a `Mesh` of every device of every process (axis
`data`). The candidate axis of each batch is split over it; each process supplies the rows of its
own devices (`jax.make_array_from_process_local_data`) and reads back only its own shards.
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
