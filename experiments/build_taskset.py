r"""Builds a predefined task set (K-means or random) from a pool and writes it with its provenance.

  python -m experiments.build_taskset --config=configs/taskset.py --workdir=tasksets
  python -m experiments.build_taskset --config=configs/taskset.py:construction=random,k=50,seed=1 \
      --config.source=pool.json --config.exclude=scored_pool.json --workdir=tasksets

Writes WORKDIR/<name>.json (the task set in the input format; each record keeps its fields plus
"taskset": {"pool_id", "cluster", "distance"}) and WORKDIR/<name>.provenance.json. Rerunning the
same request reuses the files.
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/taskset.py", "Task-set config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created).", required=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nuggets_jax import data, tasksets

    config = _CONFIG.value
    with cli.user_errors():
        spec = tasksets.TaskSetSpec(config.construction, config.k, config.m, config.seed, config.n_init)
        spec.check()
        source = tasksets.load_source(config.source, config.exclude or None, log=cli.log)
        template = data.Template.from_config(config.data)
        if config.max_task_tokens:
            tokenizer = tasksets.load_tokenizer(config.model.path)
            eligible = [source.records[i] for i in source.eligible]
            fits = tasksets.prompt_fits(tokenizer, eligible, template, config.max_task_tokens)
            source = tasksets.restrict(source, fits, f"prompt shorter than max_task_tokens={config.max_task_tokens}")
        builder = tasksets.TaskSetBuilder(
            source,
            config.model.path,
            config.model.dtype,
            template,
            tasksets.EmbeddingConfig(**config.embedding.to_dict()),
            log=cli.log,
        )
        path = pathlib.Path(_WORKDIR.value).expanduser() / f"{config.name or spec.name}.json"
        result, reused = tasksets.build_or_reuse(builder, spec, path)
        what = "reused" if reused else "wrote"
        cli.log(
            f"{what} {path} ({len(result.records)} tasks, {spec.construction} of {result.provenance['sample_size']} "
            f"sampled from {len(source.eligible)} eligible records) and {tasksets.provenance_path(path).name}"
        )


if __name__ == "__main__":
    cli.run(main)
