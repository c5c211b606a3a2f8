"""Adaptive scoring: the exact run's golden set from a fraction of the candidate x task pairs.

- `config.py`: the settings (`AdaptiveConfig`) and the rounds of task columns (`round_columns`).
- `intervals.py`: per-task values and the confidence intervals (exact "betting", approximate "normal").
- `rule.py`: the in/out decision rule, pure numpy (`decide`, `simulate`, `Rule`).
- `rounds.py`: the rounds scored through the engine (`run_adaptive`), `complete` (the missing rounds
  of a partial run, before an exact one) and the outputs.
- `replay.py`, `replay_report.py`: the offline evaluation of settings on an exact run's scores.
"""

from nuggets_jax.scoring.adaptive.config import METRICS, AdaptiveConfig, AdaptiveError, round_columns
from nuggets_jax.scoring.adaptive.replay import run_evaluation
from nuggets_jax.scoring.adaptive.rounds import CHUNK_PREFIX, AdaptiveResult, complete, run_adaptive
from nuggets_jax.scoring.adaptive.rule import Decisions, Rule, decide, simulate, target_rule

__all__ = [
    "CHUNK_PREFIX",
    "METRICS",
    "AdaptiveConfig",
    "AdaptiveError",
    "AdaptiveResult",
    "Decisions",
    "Rule",
    "complete",
    "decide",
    "round_columns",
    "run_adaptive",
    "run_evaluation",
    "simulate",
    "target_rule",
]
