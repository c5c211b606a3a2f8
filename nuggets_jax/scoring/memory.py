"""Device memory: what the parameters and the compiled scoring programs take per device, and the
model-parallel degree a model needs to fit.

Sizes come from the project's own code on abstract shapes (`nnx.eval_shape`, the sharding table)
and from XLA's memory analysis of the compiled programs, so the same numbers drive the run's
defaults (`mesh.model=0`, auto tokens per device) and the memory table of BENCHMARKS.md.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from nuggets_jax import sharding
from nuggets_jax.models.config import ModelConfig
from nuggets_jax.models.llama import Llama

# Share of a device's memory the parameters may take when `mesh.model=0` picks the degree (the
# rest is for the prefix cache, activations and XLA's buffers), and the share a compiled program
# may take in all before the auto row size is halved.
PARAM_SHARE = 0.7
PROGRAM_SHARE = 0.92


def device_memory(device=None, override_gib: float = 0.0) -> int | None:
    """Bytes a device may use: `override_gib` if set, else what the runtime reports (None on CPU)."""
    if override_gib:
        return int(override_gib * 2**30)
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def abstract_state(config: ModelConfig, dtype):
    """The model's parameter state as ShapeDtypeStructs (no memory)."""
    return nnx.state(nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0))))


def param_bytes(config: ModelConfig, dtype, degree: int, replicate_kv: bool = True) -> int:
    """Parameter bytes per device at model-parallel `degree` under the sharding table (as the scoring
    job lays them out: KV heads replicated where that lets the attention split, `replicate_kv`)."""
    if replicate_kv:
        config = sharding.scoring_config(config, degree)
    plan = sharding.ShardPlan.of(config, degree)
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state(config, dtype)):
        spec = plan.spec(sharding._leaf_name(path))
        shape = [
            n // degree if axis == "model" else n
            for n, axis in zip(leaf.shape, [*spec, *[None] * 8][: len(leaf.shape)], strict=True)
        ]
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def program_bytes(compiled) -> int:
    """Peak bytes per device of a compiled program: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def fit_degree(config: ModelConfig, dtype, limit: int | None, local_devices: int) -> int:
    """`mesh.model=0`: the smallest divisor of the local device count at which the parameters take at
    most PARAM_SHARE of `limit` (1 when the limit is unknown, as on CPU).

    Raises:
      ShardingError: the model does not fit even split over every local device; names the degree
        it needs.
    """
    if limit is None:
        return 1
    budget = PARAM_SHARE * limit
    for degree in (d for d in range(1, local_devices + 1) if local_devices % d == 0):
        if param_bytes(config, dtype, degree) <= budget:
            return degree
    needed = next((d for d in (2**k for k in range(1, 12)) if param_bytes(config, dtype, d) <= budget), None)
    smallest = min(param_bytes(config, dtype, d) for d in range(1, local_devices + 1) if local_devices % d == 0)
    fix = (
        f"it needs mesh.model >= {needed}: use hosts with at least {needed} devices each."
        if needed
        else "it does not fit at any degree of mesh.model on these devices."
    )
    raise sharding.ShardingError(
        f"the model's parameters need at least {gib(smallest)} per device at any mesh.model that divides "
        f"this host's {local_devices} devices (budget {gib(budget)} of {gib(limit)}); {fix}"
    )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
