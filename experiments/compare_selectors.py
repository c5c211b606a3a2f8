r"""Which selector's k records fine-tune best: Nuggets vs IFD, perplexity, length, random and Nuggets + diversity.

  python -m experiments.compare_selectors --config=configs/compare_selectors.py:runlocal --workdir=/tmp/sel_local
  python -m experiments.compare_selectors --config=configs/compare_selectors.py:public --workdir=workdirs/selectors

Rerunning the same command on the same workdir resumes: scoring, training and evaluations are reused.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/compare_selectors.py", "Selector comparison config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).", required=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nuggets_jax.finetune import selectors

    with cli.user_errors():
        results = selectors.run_selector_comparison(_CONFIG.value, _WORKDIR.value, log=cli.log)
        for line in results["summary"]:
            cells = ", ".join(
                f"{s} Δ NLL/token {line[f'{s}/delta_nll_per_token']:+.4f} win {line[f'{s}/win_rate_vs_base']:.3f}"
                for s in results["eval_sets"]
            )
            cli.log(f"{line['selector']:>16}: {cells}")


if __name__ == "__main__":
    cli.run(main)
