"""Settings of the adaptive mode: its config, its error type and the rounds they determine.

The rounds are one seeded random permutation of the task columns, shared by every candidate and cut
every `tasks_per_round` tasks; the decision rule (`rule`) and the scoring loop
(`rounds`) both follow it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from nuggets_jax import metrics as metrics_lib
from nuggets_jax.errors import UserError

METRICS = metrics_lib.ADAPTIVE_METRICS  # the metrics the rounds can decide on


class AdaptiveError(UserError):
    """A config, selection rule or store the adaptive mode cannot use; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """Knobs of the adaptive mode (`config.adaptive.*`).

    Attributes:
      confidence: probability that every in/out decision of the run is right (union over candidates).
      initial_tasks: tasks every candidate gets before the first decision (rounded up to whole rounds).
      tasks_per_round: tasks given per round to each undecided candidate.
      seed: seed of the task permutation.
      grid: hypothesised means tested per interval (resolution of the interval ends).
      range_margin: widening of the observed value range, for metrics without a known range.
      union: True: every decision of the run holds together with probability >= confidence (each
        interval at (1 - confidence) / C). False: each candidate's interval holds with probability
        >= confidence on its own, with no joint promise; much cheaper, see the module docstring.
      interval: "betting" (exact: holds for any values in the range) or "normal" (Student-t with
        the finite-population correction: approximate, tighter for few tasks).
      panel: reference candidates (seeded) scored in every round; intervals are then taken for the
        values relative to the panel's mean on each task, which removes the task difficulty all
        candidates share (paired comparison). 0 = none.
      compare: "candidate": the rule compares each candidate's own interval with the others'.
        "pairwise" (normal intervals, top-N rules): it compares two candidates through an interval
        for the difference of their metrics on the tasks both saw, whose noise is far smaller (the
        task difficulty they share cancels, and one interval replaces two).
    """

    confidence: float = 0.9
    initial_tasks: int = 10
    tasks_per_round: int = 10
    seed: int = 0
    grid: int = 201
    range_margin: float = 0.5
    union: bool = True
    interval: str = "betting"
    panel: int = 0
    compare: str = "candidate"

    def __post_init__(self):
        if not 0.0 < self.confidence < 1.0:
            raise AdaptiveError(f"adaptive.confidence must be in (0, 1), got {self.confidence}.")
        if self.tasks_per_round < 1 or self.initial_tasks < 1:
            raise AdaptiveError(
                f"adaptive.tasks_per_round and adaptive.initial_tasks must be at least 1, got "
                f"{self.tasks_per_round} and {self.initial_tasks}."
            )
        if self.grid < 3:
            raise AdaptiveError(f"adaptive.grid must be at least 3, got {self.grid}.")
        if self.range_margin < 0:
            raise AdaptiveError(f"adaptive.range_margin must be >= 0, got {self.range_margin}.")
        if self.interval not in ("betting", "normal"):
            raise AdaptiveError(f"adaptive.interval must be betting or normal, got {self.interval!r}.")
        if self.panel < 0:
            raise AdaptiveError(f"adaptive.panel must be >= 0, got {self.panel}.")
        if self.compare not in ("candidate", "pairwise"):
            raise AdaptiveError(f"adaptive.compare must be candidate or pairwise, got {self.compare!r}.")
        if self.compare == "pairwise" and self.interval != "normal":
            raise AdaptiveError("adaptive.compare=pairwise needs adaptive.interval=normal.")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AdaptiveConfig:
        """From `config.adaptive` (a ConfigDict or dict); unknown keys are an error."""
        values = dict(values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise AdaptiveError(f"unknown adaptive config field(s) {unknown}; known: {sorted(names)}.")
        return cls(**values)


def visit_order(num_tasks: int, config: AdaptiveConfig) -> np.ndarray:
    """[T] the seeded permutation of the task columns that every candidate follows."""
    return np.random.default_rng(config.seed).permutation(num_tasks).astype(np.int64)


def round_columns(num_tasks: int, config: AdaptiveConfig) -> list[np.ndarray]:
    """The task columns of each round (sorted): the visit order cut every tasks_per_round tasks."""
    order, k = visit_order(num_tasks, config), config.tasks_per_round
    return [np.sort(order[i : i + k]) for i in range(0, num_tasks, k)]
