"""Task sets: which examples the scoring job scores candidates against, and how stable a ranking is.

A task set is K examples drawn from a source (a file, or generated held-out tasks) by K-means over
model embeddings of a seeded sample of M, or at random from the same sample. A sweep builds many
task sets, scores their union once and reads each variant's ranking off that one run as a column
subset, to measure how much the golden set depends on the task set (docs/ARCHITECTURE.md).

Modules:
  source: the examples task sets are drawn from (`load_source`, `read_valid_records`), minus
    exclusions and restrictions (`restrict`, `prompt_fits`).
  (embeddings come from `scoring.embedding`: the model's mean final hidden state of an example.)
  build: K-means and random task sets (`TaskSetSpec`, `TaskSetBuilder`), written with their
    provenance and reused when a request matches (`build_or_reuse`).
  stability: rank correlations and top-fraction overlaps between two rankings.
  sweep_spec: a sweep's config resolved once (`expand`, `reference_specs`, `resolve_sweep`).
  sweep: the sweep's phases (`run_sweep`).
  report: the sweep's report.md and plots (`write_sweep_report`).
"""

from nuggets_jax.scoring.embedding import EmbeddingConfig, EmbeddingError
from nuggets_jax.tasksets.build import (
    CONSTRUCTIONS,
    TASKSET_FIELD,
    TaskSet,
    TaskSetBuilder,
    TaskSetSpec,
    build_from_config,
    build_or_reuse,
    provenance_path,
    read_taskset,
    write_taskset,
)
from nuggets_jax.tasksets.report import write_sweep_report
from nuggets_jax.tasksets.source import (
    Source,
    TaskSetError,
    load_source,
    load_tokenizer,
    prompt_fits,
    read_valid_records,
    restrict,
)
from nuggets_jax.tasksets.sweep import run_sweep
from nuggets_jax.tasksets.sweep_spec import SWEEP_KEYS, SweepError, SweepSpec, expand, reference_specs, resolve_sweep

__all__ = [
    "CONSTRUCTIONS",
    "SWEEP_KEYS",
    "TASKSET_FIELD",
    "EmbeddingConfig",
    "EmbeddingError",
    "Source",
    "SweepError",
    "SweepSpec",
    "TaskSet",
    "TaskSetBuilder",
    "TaskSetError",
    "TaskSetSpec",
    "build_from_config",
    "build_or_reuse",
    "expand",
    "load_source",
    "load_tokenizer",
    "prompt_fits",
    "provenance_path",
    "read_taskset",
    "read_valid_records",
    "reference_specs",
    "resolve_sweep",
    "restrict",
    "run_sweep",
    "write_sweep_report",
    "write_taskset",
]
