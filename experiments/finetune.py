r"""Fine-tunes on golden top-k, random-k and the full pool at equal steps; evaluates all on held-out data.

  python -m experiments.finetune --config=configs/finetune.py:runlocal --workdir=/tmp/ft_local
  python -m experiments.finetune --config=configs/finetune.py:scoring_workdir=/tmp/wd_default \
      --workdir=workdirs/finetune_default

Rerunning the same command on the same workdir resumes: finished variants are not retrained.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py", "Fine-tuning config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).", required=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nuggets_jax import finetune

    with cli.user_errors():
        results = finetune.run_comparison(_CONFIG.value, _WORKDIR.value, log=cli.log)
        for row in results["variants"]:
            cli.log(
                f"{row['variant']:>12}: eval NLL/token {row['nll_per_token']:.4f} "
                f"(base {results['base']['nll_per_token']:.4f}), win rate vs base {row['win_rate_vs_base']:.3f}"
            )


if __name__ == "__main__":
    cli.run(main)
