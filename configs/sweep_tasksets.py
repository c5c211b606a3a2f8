r"""Task-set sweep: `python -m experiments.sweep --config=configs/sweep_tasksets.py[:ARGS] --workdir=DIR`.

Builds every task set of the grid (task-set sizes x constructions x seeds), scores the candidates
once against the union of their tasks, evaluates every (task set, metric) variant as a column
subset of that one run and reports its stability against the reference ranking (the largest
K-means set of the same metric by default).

ARGS (comma separated):
  pool=PATH      candidates come from this .json/.jsonl file and the task sets from the rest of it
                 (the scored candidates are excluded by content); default: the generated pool and
                 generated held-out tasks (nuggets_jax.synthetic).
  candidates=N   score a seeded sample of N candidates of the pool (0 = all of it).
  cpu            a grid these 2-CPU machines finish in well under an hour with the default model
                 (the README's real-data result): 100 candidates, tasks cut at 128 tokens, K in
                 (5, 10, 20) of M=200, 2 seeds.
  runlocal       a tiny grid that runs in seconds.
The grid lives in `config.sweep` and can be overridden, e.g. `--config.sweep.sizes="(5,10,25)"`
`--config.sweep.seeds="(0,)"`; so can every scoring field (`--config.score.model.path=...`) and
task-set field (`--config.taskset.embedding.max_tokens=128`).
"""

import itertools

import ml_collections

from configs import common
from configs import score as score_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, pool="", candidates=0, preset="default", cpu=False, runlocal=False)
    config = ml_collections.ConfigDict()

    # The one scoring run (configs/score.py); data.tasks is the union the sweep writes.
    config.score = score_config.get_config(f"preset={arg.preset}")
    config.score.report = True
    config.metric = "win_rate"  # default metric of a variant (the sweep varies it)
    config.pool_sample = arg.candidates  # score a seeded sample of N candidates of score.data.pool (0 = all)
    config.pool_seed = 0

    # Base task-set construction (configs/taskset.py); the sweep varies construction, k and seed.
    config.taskset = ml_collections.ConfigDict()
    config.taskset.source = "default"  # "default" (generated tasks) | "pool" (score.data.pool) | a file
    config.taskset.exclude_pool = True  # never draw a task that is one of the scored candidates
    config.taskset.exclude = ""  # a further file of examples not to draw
    config.taskset.construction = "kmeans"
    config.taskset.k = 100
    config.taskset.m = 1000  # examples sampled per seed before clustering (0 = all)
    config.taskset.seed = 0
    config.taskset.n_init = 10
    config.taskset.embedding = ml_collections.ConfigDict()
    config.taskset.embedding.text = "full"
    config.taskset.embedding.max_tokens = 256
    config.taskset.embedding.batch_tokens = 8192
    config.taskset.embedding.max_buckets = 6

    # The grid (get_sweep below turns it into override dicts).
    config.sweep = ml_collections.ConfigDict()
    config.sweep.sizes = (5, 10, 25, 50, 100)
    config.sweep.constructions = ("kmeans", "random")
    config.sweep.seeds = (0, 1, 2)
    config.sweep.metrics = ("win_rate", "mean_logp_gain")

    # "largest" (largest K of reference_construction, lowest seed, same metric) | "union" | a task-set
    # name such as "kmeans_k100_m1000_s0".
    config.reference = "largest"
    config.reference_construction = "kmeans"
    config.top_fractions = (0.01, 0.05, 0.1)

    if arg.pool:
        config.score.data.pool = arg.pool
        config.taskset.source = "pool"
    if arg.cpu:
        config.pool_sample = arg.candidates or 100
        config.score.data.max_task_tokens = 128
        config.score.data.max_prefix_tokens = 256
        config.taskset.m = 200
        config.taskset.embedding.max_tokens = 128
        config.sweep.sizes = (5, 10, 20)
        config.sweep.seeds = (0, 1)
    if arg.runlocal:
        config.pool_sample = arg.candidates or 16
        config.score.data.max_task_tokens = 64
        config.score.scoring.chunk_candidates = 8
        config.taskset.m = 40
        config.taskset.n_init = 2
        config.taskset.embedding.max_tokens = 64
        config.sweep.sizes = (2, 4, 8)
        config.sweep.seeds = (0, 1)
    return config


def get_sweep(config: ml_collections.ConfigDict):
    """Yields one override dict per variant: every size x construction x seed x metric."""
    grid = itertools.product(config.sweep.constructions, config.sweep.sizes, config.sweep.seeds, config.sweep.metrics)
    for construction, k, seed, metric in grid:
        yield {"taskset.construction": construction, "taskset.k": k, "taskset.seed": seed, "metric": metric}
