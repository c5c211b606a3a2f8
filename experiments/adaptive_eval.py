r"""Adaptive vs exact scoring on the same pool: recall of the exact golden set against compute.

  python -m experiments.adaptive_eval --config=configs/adaptive_eval.py --workdir=workdirs/adaptive_eval \
      --config.pool.source=../shared/data/alpagasus/random_9k.json \
      --config.score.data.tasks=../shared/data/nuggets/alpaca_gpt4_kmeans_100.json

Scores the pool exactly once (or reuses DIR/exact/scores.npz), replays every adaptive setting
offline on the exact per-(candidate, task) values (the rule needs nothing else, so the replay makes
exactly the decisions a real run would), and writes DIR/report.md, DIR/results.json and
DIR/plots/. With --config.real_run.enabled=True one setting also runs through the engine into
DIR/adaptive, for the compute it really saves. The library side is
`nuggets_jax.scoring.adaptive.replay`.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/adaptive_eval.py", "Experiment config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; the exact run is reused).", required=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nuggets_jax.scoring import adaptive

    with cli.user_errors():
        path = adaptive.run_evaluation(_CONFIG.value, _WORKDIR.value, log=cli.log)
        cli.log(f"report: {path}")


if __name__ == "__main__":
    cli.run(main)
