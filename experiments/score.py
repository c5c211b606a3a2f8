r"""Scores a pool with the Nuggets one-shot golden score and writes the workdir.

  python -m experiments.score --config=configs/score.py --workdir=workdirs/default
  python -m experiments.score --config=configs/score.py:preset=original \
      --config.model.path=/models/llama --config.data.pool=pool.jsonl --config.data.tasks=tasks.json \
      --workdir=workdirs/mine

Rerunning the same command on the same workdir resumes where it stopped.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/score.py", "Scoring config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).", required=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nuggets_jax import scoring

    with cli.user_errors():
        run = scoring.run_score(_CONFIG.value, _WORKDIR.value, log=cli.log)
        if run and run.get("mode") == "adaptive":
            cli.log(
                f"done: golden set decided with {run['pairs_scored']} of {run['pairs_exact']} pairs "
                f"({run['compute_fraction']:.1%}) in {run['wall_s']:.1f}s; outputs in {_WORKDIR.value}"
            )
        elif run:
            cli.log(
                f"done: {run['counts']['pairs']} pairs in {run['wall_s']:.1f}s "
                f"({run['pairs_per_s']:.1f} pairs/s, {run['tokens_per_s']:.0f} task tokens/s); "
                f"outputs in {_WORKDIR.value}"
            )


if __name__ == "__main__":
    cli.run(main)
