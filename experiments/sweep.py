r"""Runs a task-set sweep: builds every task set, scores the union once, reports the stability of each variant.

  python -m experiments.sweep --config=configs/sweep_tasksets.py:runlocal --workdir=workdirs/sweep_local
  python -m experiments.sweep --config=configs/sweep_tasksets.py:pool=pool.json,cpu --workdir=workdirs/sweep

The config file must define `get_sweep(config)` (or `sweep(config)`), yielding override dicts of
the variants (keys: metric, taskset.construction, taskset.k, taskset.m, taskset.seed,
taskset.n_init). Rerunning the same command reuses the task sets and the scoring workdir.
"""

import importlib.util
import pathlib

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/sweep_tasksets.py", "Sweep config file (with a get_sweep function).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; reruns reuse its work).", required=True)


def sweep_function(config_path: str):
    """The `get_sweep` (or `sweep`) function of the config file."""
    spec = importlib.util.spec_from_file_location("_sweep_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("get_sweep", "sweep"):
        if callable(getattr(module, name, None)):
            return getattr(module, name)
    from nuggets_jax.tasksets import SweepError

    raise SweepError(f"{config_path}: defines no get_sweep(config) function; a sweep config needs one.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nuggets_jax import tasksets

    # The flag holds "file.py:ARGS"; the file is what comes before the first colon.
    path = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")[0]
    with cli.user_errors():
        config = _CONFIG.value
        result = tasksets.run_sweep(config, sweep_function(path)(config), _WORKDIR.value, log=cli.log)
        report = pathlib.Path(_WORKDIR.value) / "report.md"
        cli.log(f"done in {result['timings']['wall_s']:.1f}s: {report}")


if __name__ == "__main__":
    cli.run(main)
