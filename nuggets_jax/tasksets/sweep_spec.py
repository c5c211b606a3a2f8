"""What a sweep evaluates, resolved from its config once: the variants, their references, the spec.

A variant is (task-set construction, K, M, seed, n_init, metric); the sweep function of a config
file yields override dicts (keys `SWEEP_KEYS`) that `expand` applies to the config. Only what a
column subset of one scoring run can answer may vary. `resolve_sweep` validates everything (variants,
references, the scoring job's config) before the sweep reads or writes anything; the phases of
`sweep.run_sweep` read only its `SweepSpec`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from nuggets_jax import data as data_lib
from nuggets_jax import metrics as metrics_lib
from nuggets_jax.errors import UserError
from nuggets_jax.scoring import embedding as embedding
from nuggets_jax.scoring import job as job
from nuggets_jax.tasksets import build as taskset_lib
from nuggets_jax.tasksets import source as source_lib

# What a sweep may vary: anything else would need a second scoring run.
SWEEP_KEYS = ("metric", "taskset.construction", "taskset.k", "taskset.m", "taskset.seed", "taskset.n_init")
_NAME = re.compile(r"(kmeans|random)_k(\d+)_m(\d+)_s(\d+)")


class SweepError(UserError):
    """A sweep that cannot run as configured; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One evaluated cell of the sweep: a task set and the metric its ranking uses."""

    spec: taskset_lib.TaskSetSpec
    metric: str

    @property
    def name(self) -> str:
        return f"{self.spec.name}/{self.metric}"


def expand(config, overrides: Iterable[Mapping[str, Any]]) -> list[Variant]:
    """Applies each override dict (keys of `SWEEP_KEYS`) to the config's task set and metric.

    Raises:
      SweepError: a key that cannot vary in a sweep, a bad value, or a repeated variant.
    """
    base = {
        "metric": config.metric,
        **{f"taskset.{k}": config.taskset[k] for k in ("construction", "k", "m", "seed", "n_init")},
    }
    variants: list[Variant] = []
    for i, override in enumerate(overrides):
        if not isinstance(override, Mapping):
            raise SweepError(f"sweep item {i}: expected a dict of overrides, got {type(override).__name__}.")
        bad = [key for key in override if key not in SWEEP_KEYS]
        if bad:
            raise SweepError(
                f"sweep item {i} {dict(override)}: {', '.join(map(repr, bad))} cannot vary in a sweep (it scores "
                f"once); vary only {', '.join(SWEEP_KEYS)}, and set everything else in the config."
            )
        values = {**base, **override}
        spec = taskset_lib.TaskSetSpec(**{k.removeprefix("taskset."): v for k, v in values.items() if k != "metric"})
        try:
            spec.check()
        except source_lib.TaskSetError as e:
            raise SweepError(f"sweep item {i} {dict(override)}: {e}") from None
        if values["metric"] not in metrics_lib.METRICS:
            raise SweepError(
                f"sweep item {i} {dict(override)}: unknown metric {values['metric']!r}; "
                f"choose one of: {', '.join(metrics_lib.METRICS)}."
            )
        variant = Variant(spec, values["metric"])
        if variant in variants:
            raise SweepError(f"sweep item {i} {dict(override)}: variant {variant.name} appears twice.")
        variants.append(variant)
    if not variants:
        raise SweepError("the sweep is empty: its sweep function yielded no override.")
    return variants


def reference_specs(config, variants: list[Variant]) -> dict[str, taskset_lib.TaskSetSpec | None]:
    """The reference task set of each metric (None = every column of the union).

    `config.reference`: "largest" = the variant of `config.reference_construction` with the
    largest K and then the lowest seed, with the same metric; "union"; or a task-set name such as
    "kmeans_k100_m1000_s0" (built even when it is not a variant).
    """
    metrics = list(dict.fromkeys(v.metric for v in variants))
    choice = config.reference
    if choice == "union":
        return dict.fromkeys(metrics)
    if choice == "largest":
        out = {}
        for metric in metrics:
            pool = [
                v.spec for v in variants if v.metric == metric and v.spec.construction == config.reference_construction
            ]
            if not pool:
                raise SweepError(
                    f"reference=largest: no {config.reference_construction} variant uses metric {metric!r}; add one, "
                    "set reference_construction, or set reference=union or a task-set name."
                )
            out[metric] = min(pool, key=lambda s: (-s.k, s.seed, s.m))
        return out
    match = _NAME.fullmatch(choice)
    if not match:
        raise SweepError(
            f"unknown reference {choice!r}; use 'largest', 'union' or a task-set name like 'kmeans_k100_m1000_s0'."
        )
    kind, k, m, seed = match.groups()
    spec = taskset_lib.TaskSetSpec(kind, int(k), int(m), int(seed), config.taskset.n_init)
    spec.check()
    return dict.fromkeys(metrics, spec)


def _score_config(config):
    """The scoring job's config: config.score with the pool and task file the sweep decides."""
    score = copy.deepcopy(config.score)
    score.unlock()
    score.metric = config.metric
    score.data.max_tasks = 0
    return score


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """The sweep's config resolved once and validated: everything the phases derive from it.

    Attributes:
      variants: the evaluated cells, in sweep order.
      references: the reference task set of each metric (None = every column of the union).
      tasksets: every task set to build or reuse: the variants' and then the references'.
      score: the scoring job's config (`_score_config`), validated; the phases set its pool and tasks.
      pool_sample: candidates sampled from the pool file (0 = the whole pool, cut at
        `score.data.max_candidates`), seeded by `pool_seed`.
      task_source: the file (or "default") task sets are drawn from.
      exclude_pool: leave the scored candidates out of the task source.
      exclude: a file of further examples left out of the task source ("" = none).
      fractions: the top fractions whose overlap with the reference is reported.
      template: the prompt template of the scoring job.
      policy: the scoring job's token policy (preset + `score.data` overrides).
      embedding: how task candidates are embedded for K-means.
    """

    variants: tuple[Variant, ...]
    references: dict[str, taskset_lib.TaskSetSpec | None]
    tasksets: tuple[taskset_lib.TaskSetSpec, ...]
    score: Any
    pool_sample: int
    pool_seed: int
    task_source: str
    exclude_pool: bool
    exclude: str
    fractions: tuple[float, ...]
    # None: the model's chat template (data.template=chat), which `run_sweep` resolves once it has the tokenizer.
    template: data_lib.Template | data_lib.ChatTemplate | None
    policy: data_lib.TokenPolicy
    embedding: embedding.EmbeddingConfig


def resolve_sweep(config, overrides: Iterable[Mapping[str, Any]]) -> SweepSpec:
    """Validates the sweep config and its overrides before anything is read or written.

    Raises:
      SweepError, JobError, DataError: naming the field to change.
    """
    variants = expand(config, overrides)
    references = reference_specs(config, variants)
    score = _score_config(config)
    score_spec = job.validate(score)
    task_source = config.taskset.source
    if task_source == "pool":
        if config.score.data.pool == "default":
            raise SweepError("taskset.source=pool needs score.data.pool to be a file; or use taskset.source=default.")
        task_source = config.score.data.pool
    return SweepSpec(
        variants=tuple(variants),
        references=references,
        tasksets=tuple(
            dict.fromkeys([*(v.spec for v in variants), *(s for s in references.values() if s is not None)])
        ),
        score=score,
        pool_sample=config.pool_sample,
        pool_seed=config.pool_seed,
        task_source=task_source,
        exclude_pool=config.taskset.exclude_pool,
        exclude=config.taskset.exclude,
        fractions=tuple(float(f) for f in config.top_fractions),
        template=score_spec.template,
        policy=score_spec.policy,
        embedding=embedding.EmbeddingConfig(**config.taskset.embedding.to_dict()),
    )
