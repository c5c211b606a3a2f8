"""Task-set config: `python -m experiments.build_taskset --config=configs/taskset.py[:ARGS] --workdir=DIR`.

Writes DIR/<name>.json (the task set, input format) and DIR/<name>.provenance.json; a rerun with
the same request reuses them. ARGS (comma separated): `construction=kmeans|random`, `k=100`,
`m=1000`, `seed=0`, `source=PATH`, `runlocal` (k=5 of m=50: seconds). Every field below can be
overridden on the command line, e.g. `--config.source=pool.json --config.exclude=scored_pool.json`.
"""

import ml_collections

from configs import common
from nuggets_jax import data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, construction="kmeans", k=100, m=1000, seed=0, source="default", runlocal=False)
    config = ml_collections.ConfigDict()

    # Examples to draw tasks from (.json/.jsonl; records that cannot be tasks, e.g. an empty output,
    # are skipped); "default" = 1,000 generated held-out tasks (nuggets_jax.synthetic).
    config.source = arg.source
    config.exclude = ""  # a file whose examples (same instruction/input/output) must not be drawn
    config.construction = arg.construction  # kmeans | random
    config.k = arg.k  # tasks in the set
    config.m = arg.m  # examples sampled (seeded) from the source before clustering; 0 = all
    config.seed = arg.seed  # seeds the sample, K-means and the random picks
    config.n_init = 10  # K-means restarts (the lowest-inertia one is kept)
    # Keep only examples whose prompt leaves a response token within this many task tokens (set it
    # to the scoring run's data.max_task_tokens); 0 = no filter.
    config.max_task_tokens = 0
    config.name = ""  # output file name without .json; "" = <construction>_k<K>_m<M>_s<seed>

    # The scoring model embeds the examples (mean of the final hidden layer over real tokens).
    config.model = ml_collections.ConfigDict()
    config.model.path = "default"
    config.model.dtype = "float32"

    config.data = ml_collections.ConfigDict()
    # "text": the prompt template below; "chat": the model's chat template (embeddings of whole conversations).
    config.data.template = "text"
    # The paper's prompt template (nuggets_jax.data.Template); override both to change it.
    config.data.prompt_no_input = data.Template.prompt_no_input
    config.data.prompt_with_input = data.Template.prompt_with_input

    config.embedding = ml_collections.ConfigDict()
    config.embedding.text = "full"  # full (prompt + output) | prompt | output
    config.embedding.max_tokens = 256  # first tokens of each example kept
    config.embedding.batch_tokens = 8192  # rows x width per call
    config.embedding.max_buckets = 6  # length buckets, one compiled program each

    if arg.runlocal:
        config.k = 5
        config.m = 50
        config.n_init = 2
    return config
