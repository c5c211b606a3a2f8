r"""How every scorer (Nuggets metrics and baselines) agrees with outside quality labels.

  python -m experiments.agreement --config=configs/agreement.py:gold --workdir=workdirs/agreement_gold
  python -m experiments.agreement --config=configs/agreement.py:alpaca,candidates=1000 \
      --workdir=workdirs/agreement_alpaca
  python -m experiments.agreement --config=configs/agreement.py:ape --workdir=workdirs/agreement_ape

Rerunning resumes the scoring run; the table is recomputed from its ranking.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/agreement.py", "Agreement config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).", required=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nuggets_jax.scoring import agreement

    with cli.user_errors():
        result = agreement.run_agreement(_CONFIG.value, _WORKDIR.value, log=cli.log)
        for row in result["rows"]:
            cli.log(f"{row['label']:>18} {row['scorer']:>15}: {row['statistic']} {row['value']:.3f} (n={row['n']})")


if __name__ == "__main__":
    cli.run(main)
