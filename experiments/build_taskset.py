r"""Builds a predefined task set (K-means or random) from a pool and writes it with its provenance.

  python -m experiments.build_taskset --config=configs/taskset.py --workdir=tasksets
  python -m experiments.build_taskset --config=configs/taskset.py:construction=random,k=50,seed=1 \
      --config.source=pool.json --config.exclude=scored_pool.json --workdir=tasksets

Writes WORKDIR/<name>.json (the task set in the input format; each record keeps its fields plus
"taskset": {"pool_id", "cluster", "distance"}) and WORKDIR/<name>.provenance.json. Rerunning the
same request reuses the files.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/taskset.py", "Task-set config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created).", required=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nuggets_jax import tasksets

    with cli.user_errors():
        tasksets.build_from_config(_CONFIG.value, _WORKDIR.value, log=cli.log)


if __name__ == "__main__":
    cli.run(main)
