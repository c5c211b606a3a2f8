"""Selector comparison config.

`python -m experiments.compare_selectors --config=configs/compare_selectors.py[:ARGS] --workdir=DIR`

For one pool: hold out some records, build a K-means task set from the rest, score it once (every
Nuggets metric and every baseline), let each selector pick k records, fine-tune the same model on
each pick with the same budget, and evaluate every model and the base model on held-out sets.
Writes DIR/report.md (table + plot) and DIR/results.json; a rerun resumes.

ARGS (comma separated): `runlocal` (a generated pool, a tiny budget: minutes on a laptop CPU),
`public` (AlpaGasus' random Alpaca sample from ../shared/data, evaluated on its held-out records, the
Self-Instruct 252 tasks and AlpacaEval's reference outputs: the README's result), `pool=PATH` (alone,
or with `public` for its sizes and evaluation sets on another pool).
Every field can be overridden on the command line, e.g. `--config.k=100`, `--config.train.steps=200`.
"""

import ml_collections

from configs import common
from configs import finetune as finetune_config
from configs import score as score_config
from configs import taskset as taskset_config

SHARED_DATA = "../shared/data"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, runlocal=False, public=False, pool="default")
    config = ml_collections.ConfigDict()

    config.pool = arg.pool  # .json/.jsonl/.parquet; "default" = a generated pool of pool_size records
    config.pool_size = 400
    config.max_pool = 0  # the first N records of the pool file (0 = all), after those with an empty response
    config.heldout = 100  # pool records held out (seeded) as the evaluation set "heldout"
    config.seed = 0  # the held-out split (and the generated pool)
    config.k = 40  # records every selector picks
    # win_rate | mean_logp_gain | mean_ppl_drop | token_acc_gain (Nuggets, K-means task set), a baseline
    # (perplexity | ifd | response_ppl | length), random (one pick per seed), diverse (below).
    config.selectors = ("win_rate", "mean_logp_gain", "diverse", "ifd", "perplexity", "length", "random")
    config.random_seeds = (0, 1, 2)
    # The `diverse` selector: select.Diversity over this metric's ranking (see configs/score.py, select.*).
    config.diversity = ml_collections.ConfigDict()
    config.diversity.metric = "win_rate"
    config.diversity.trade_off = 0.5
    config.diversity.method = "k_center"
    config.diversity.shortlist = 4.0

    # "text" (the paper's prompt template), "chat" (the model's chat template) or "auto" (chat when
    # the pool holds a conversation, else text): for the task set, scoring, training and evaluation.
    config.template = "auto"

    config.model = ml_collections.ConfigDict()
    config.model.path = "default"  # scored, embedded and fine-tuned

    # The task set: K-means over the selection pool (configs/taskset.py; source and model are set here).
    config.taskset = taskset_config.get_config()
    config.taskset.k = 32
    config.taskset.m = 0  # cluster every selection-pool record
    # The scoring run (configs/score.py; pool, tasks, model and baselines.compute are set here).
    config.score = score_config.get_config()
    # Training, identical for every selection (configs/finetune.py's train fields).
    config.train = finetune_config.get_config().train
    config.train.steps = 40
    config.mesh = ml_collections.ConfigDict()
    config.mesh.model = 1

    config.eval = ml_collections.ConfigDict()
    # "heldout" (the held-out pool records), "default" (generated tasks) or .json/.jsonl files (input
    # format, Self-Instruct user-oriented tasks, AlpacaEval outputs: their `output` is the reference).
    config.eval.sets = ("heldout", "default")
    config.eval.format = "auto"
    config.eval.size = 200  # "default": generated tasks
    config.eval.seed = 7
    config.eval.max_examples = 0  # first N of each set (0 = all)
    config.eval.max_tokens = 512

    config.fresh = False
    config.progress = True

    if arg.public:  # about 45 minutes on 2 CPU cores with the default model
        if arg.pool == "default":  # `public,pool=PATH` keeps the rest of the preset for another pool
            config.pool = f"{SHARED_DATA}/alpagasus/random_9k.json"
        config.max_pool = 800
        config.heldout = 150
        config.k = 60
        config.taskset.k = 12
        config.train.steps = 16
        config.train.batch_rows = 4
        config.train.max_tokens = 256
        config.eval.sets = (
            "heldout",
            f"{SHARED_DATA}/alpagasus/sinstruct_test_set.jsonl",
            f"{SHARED_DATA}/alpaca_eval/text_davinci_003_model_outputs.json",
        )
        config.eval.max_examples = 100
        config.eval.max_tokens = 256
    if arg.runlocal:
        config.pool_size = 48
        config.heldout = 8
        config.k = 4
        config.random_seeds = (0, 1)
        config.taskset.k = 3
        config.taskset.n_init = 2
        config.score.scoring.chunk_candidates = 8
        config.train.steps = 2
        config.train.batch_rows = 2
        config.train.warmup_steps = 1
        config.train.checkpoint_every = 2
        config.eval.size = 8
    return config
