"""Adaptive vs exact scoring on one pool:
`python -m experiments.adaptive_eval --config=configs/adaptive_eval.py[:runlocal] --workdir=DIR`.

The exact run (DIR/exact, or `exact_workdir`) is scored once, or reused when its scores.npz
exists; every adaptive setting is then replayed offline on its per-(candidate, task) values, for
several task-permutation seeds. `real_run` also runs one adaptive setting through the engine into
DIR/<real_run.subdir> to measure the compute it really saves. The replay, its report and plots
are `nuggets_jax.scoring.adaptive.replay`.

The documented result (README), about 90 min of CPU for the exact run on 2 shared cores:
  --config.pool.source=../shared/data/alpagasus/random_9k.json --config.pool.size=200
  --config.score.data.tasks=../shared/data/nuggets/alpaca_gpt4_kmeans_100.json
  --config.score.data.max_task_tokens=64 --config.real_run.enabled=True
  "--config.confidences=(0.99, 0.95, 0.9, 0.8, 0.5)"
"""

import ml_collections

from configs import common
from configs import score as score_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, runlocal=False)
    config = ml_collections.ConfigDict()

    # The pool: "default" (the generated pool) or a .json/.jsonl file; a seeded sample of `size`
    # records with a non-empty instruction and output (0 = the whole file) is written to DIR/pool.json.
    config.pool = ml_collections.ConfigDict()
    config.pool.source = "default"
    config.pool.size = 200
    config.pool.seed = 0

    # The scoring config (configs/score.py) of the exact run and the real adaptive run; every field
    # can be overridden (--config.score.data.tasks=...). data.pool is DIR/pool.json, the sample.
    config.score = score_config.get_config()
    config.score.data.max_task_tokens = 64  # None = the preset's
    config.exact_workdir = ""  # "" = DIR/exact

    config.metrics = ("win_rate", "mean_logp_gain")
    config.fractions = (0.01, 0.05, 0.1)  # golden set = the top fraction; recall of the exact one
    config.confidences = (0.99, 0.9, 0.5)
    # Settings, ";"-separated: interval (betting | normal), guarantee (joint = adaptive.union=True |
    # candidate), then optional adaptive.* overrides "key=value" (e.g. panel=8), all ","-separated.
    config.settings = (
        "betting,joint; normal,joint; normal,joint,compare=pairwise; betting,candidate; normal,candidate; "
        "normal,candidate,panel=8; normal,candidate,compare=pairwise"
    )
    config.repeats = 5  # task permutations (adaptive.seed = 0 .. repeats - 1)

    # Every other adaptive.* setting (configs/score.py: config.adaptive).
    config.adaptive = ml_collections.ConfigDict()
    config.adaptive.initial_tasks = 10
    config.adaptive.tasks_per_round = 10
    config.adaptive.grid = 201
    config.adaptive.range_margin = 0.5

    # One setting run for real through the engine, for the compute it actually saves.
    config.real_run = ml_collections.ConfigDict()
    config.real_run.enabled = False
    config.real_run.metric = "mean_logp_gain"
    config.real_run.fraction = 0.1
    config.real_run.confidence = 0.9
    config.real_run.setting = "normal,candidate,compare=pairwise"  # as in `settings`
    config.real_run.subdir = "adaptive"  # DIR/subdir; an existing finished run of the same setting is reused

    config.target_recall = 0.95  # the target: exact top-10% recall at <= 30% of the pairs
    config.target_fraction = 0.3

    if arg.runlocal:
        config.pool.size = 24
        config.score.data.max_task_tokens = None
        config.metrics = ("win_rate",)
        config.fractions = (0.1,)
        config.confidences = (0.9,)
        config.settings = "betting,joint; normal,candidate"
        config.repeats = 2
        config.adaptive.initial_tasks = 4
        config.adaptive.tasks_per_round = 4
        config.adaptive.grid = 61
    return config
