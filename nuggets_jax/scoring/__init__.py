"""Stage 1: score a pool of candidates against a task set (docs/ARCHITECTURE.md, "Data flow").

- `engine.py`: the compiled programs for one task layout (encode a block of prefixes, score row
  groups against the prefix K/V), `EngineConfig` (the call sizes), `PassStats`.
- `packing.py`: task rows, row groups, task windows and prefix buckets (the static shapes).
- `blocks.py`: the block plan and the one block loop (`BlockScorer`) used by the exact pass and the
  adaptive rounds: dispatch ahead, finite check, statistics, progress bar, chunk writes.
- `one_shot.py`: the exact pass over a pool, resumable.
- `job.py`: a config to a workdir (the main job): `validate` resolves the config into a `ScoreSpec`,
  `run_score` runs the phases; `run_info.py` is run.json.
- `report.py`: report.md and its plots.
- `adaptive/`: adaptive scoring (the golden set from a fraction of the pairs).
"""

from nuggets_jax.scoring.blocks import BlockScorer, blocks_to_run, check_finite, plan_blocks
from nuggets_jax.scoring.engine import Engine, EngineConfig, PassStats, ScoringError, prefix_lengths_of
from nuggets_jax.scoring.job import JobError, ScoreSpec, WorkdirMismatchError, run_score, validate
from nuggets_jax.scoring.one_shot import OneShotResult, run_one_shot
from nuggets_jax.scoring.report import write_report

__all__ = [
    "BlockScorer",
    "Engine",
    "EngineConfig",
    "JobError",
    "OneShotResult",
    "PassStats",
    "ScoreSpec",
    "ScoringError",
    "WorkdirMismatchError",
    "blocks_to_run",
    "check_finite",
    "plan_blocks",
    "prefix_lengths_of",
    "run_one_shot",
    "run_score",
    "validate",
    "write_report",
]
