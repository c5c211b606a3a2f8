"""Stage 1: score a pool of candidates against a task set (docs/ARCHITECTURE.md, "Data flow").

- `engine.py`: the compiled programs for one task layout (encode a block of prefixes, score row
  groups against the prefix K/V), `EngineConfig` (the call sizes), `PassStats`.
- `packing.py`: task rows, row groups, task windows and prefix buckets (the static shapes).
- `blocks.py`: the block plan and the one block loop (`BlockScorer`) used by the exact pass and the
  adaptive rounds: dispatch ahead, finite check, statistics, progress bar, chunk writes.
- `one_shot.py`: the exact pass over a pool, resumable.
- `baselines.py`: the baseline pass (each response after its prompt and alone: perplexity, IFD).
- `embedding.py`: model embeddings of records (K-means task sets, diversity-aware selection).
- `job.py`: a config to a workdir (the main job): `validate` resolves the config into a `ScoreSpec`,
  `run_score` runs the phases; `run_info.py` is run.json.
- `report.py`: report.md and its plots.
- `adaptive/`: adaptive scoring (the golden set from a fraction of the pairs).
"""

from nuggets_jax import lazy

# The names below load their module on first use (PEP 562), so importing one module of the
# package (e.g. `report`, which regenerates a report without JAX) does not pull in JAX through the engine.
_HOMES = {
    "BlockScorer": "nuggets_jax.scoring.blocks",
    "Engine": "nuggets_jax.scoring.engine",
    "EngineConfig": "nuggets_jax.scoring.engine",
    "JobError": "nuggets_jax.scoring.job",
    "OneShotResult": "nuggets_jax.scoring.one_shot",
    "PassStats": "nuggets_jax.scoring.engine",
    "ScoreSpec": "nuggets_jax.scoring.job",
    "ScoringError": "nuggets_jax.scoring.engine",
    "WorkdirMismatchError": "nuggets_jax.scoring.job",
    "blocks_to_run": "nuggets_jax.scoring.blocks",
    "check_finite": "nuggets_jax.scoring.blocks",
    "plan_blocks": "nuggets_jax.scoring.blocks",
    "prefix_lengths_of": "nuggets_jax.scoring.engine",
    "run_one_shot": "nuggets_jax.scoring.one_shot",
    "run_score": "nuggets_jax.scoring.job",
    "validate": "nuggets_jax.scoring.job",
    "write_report": "nuggets_jax.scoring.report",
}

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

__getattr__, __dir__ = lazy.exports(__name__, _HOMES)
