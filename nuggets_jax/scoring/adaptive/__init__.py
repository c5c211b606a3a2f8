"""Adaptive scoring: the exact run's golden set from a fraction of the candidate x task pairs.

- `config.py`: the settings (`AdaptiveConfig`) and the rounds of task columns (`round_columns`).
- `intervals.py`: per-task values and the confidence intervals (exact "betting", approximate "normal").
- `rule.py`: the in/out decision rule, pure numpy (`decide`, `simulate`, `Rule`).
- `rounds.py`: the rounds scored through the engine (`run_adaptive`), `complete` (the missing rounds
  of a partial run, before an exact one) and the outputs.
- `replay.py`, `replay_report.py`: the offline evaluation of settings on an exact run's scores.
"""

from nuggets_jax import lazy

# The names below load their module on first use (PEP 562), so importing one module of the
# package (e.g. `replay_report`) does not pull in JAX through the engine.
_HOMES = {
    "AdaptiveConfig": "nuggets_jax.scoring.adaptive.config",
    "AdaptiveError": "nuggets_jax.scoring.adaptive.config",
    "AdaptiveResult": "nuggets_jax.scoring.adaptive.rounds",
    "CHUNK_PREFIX": "nuggets_jax.scoring.adaptive.rounds",
    "Decisions": "nuggets_jax.scoring.adaptive.rule",
    "METRICS": "nuggets_jax.scoring.adaptive.config",
    "Rule": "nuggets_jax.scoring.adaptive.rule",
    "complete": "nuggets_jax.scoring.adaptive.rounds",
    "decide": "nuggets_jax.scoring.adaptive.rule",
    "round_columns": "nuggets_jax.scoring.adaptive.config",
    "run_adaptive": "nuggets_jax.scoring.adaptive.rounds",
    "run_evaluation": "nuggets_jax.scoring.adaptive.replay",
    "simulate": "nuggets_jax.scoring.adaptive.rule",
    "target_rule": "nuggets_jax.scoring.adaptive.rule",
}

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

__getattr__, __dir__ = lazy.exports(__name__, _HOMES)
