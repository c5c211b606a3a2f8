"""Fine-tuning comparison config: `python -m experiments.finetune --config=configs/finetune.py[:ARGS] --workdir=DIR`.

Fine-tunes the scored model on golden top-k, random-k (one run per seed) and the full pool at equal
training steps, evaluates every model and the base model on one held-out set, and writes
DIR/report.md (table + plots) and DIR/results.json.

ARGS (comma separated): `runlocal` (about a minute on a laptop CPU), `scoring_workdir=DIR` (a
finished scoring run; empty = score first into DIR/scoring with the `score` fields below).
Every field can be overridden on the command line, e.g. `--config.top_k=64`, `--config.train.steps=200`,
`--config.eval.set=/data/sinstruct_test_set.jsonl`.
"""

import ml_collections

from configs import common
from configs import score as score_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, runlocal=False, scoring_workdir="")
    config = ml_collections.ConfigDict()

    # The scoring run whose ranking picks the golden set (config.json, ranking.jsonl, golden.json).
    config.scoring_workdir = arg.scoring_workdir
    # Used only when scoring_workdir is empty: this scoring job runs first into WORKDIR/scoring.
    config.score = score_config.get_config("runlocal" if arg.runlocal else None)
    config.metric = ""  # rank by this metric from ranking.jsonl; "" = the scoring run's metric
    config.top_k = 0  # golden/random subset size; 0 = the size of the scoring run's golden.json
    config.variants = ("golden", "random", "full")
    config.random_seeds = (0, 1, 2)  # one random-k run per seed

    config.model = ml_collections.ConfigDict()
    config.model.path = ""  # "" = the scoring run's model (the same model is fine-tuned)

    # Identical for every variant, so they compare at equal steps and equal token budgets.
    config.train = ml_collections.ConfigDict()
    config.train.steps = 16
    config.train.batch_rows = 8  # packed rows per micro-batch over all devices
    config.train.micro_batches = 1  # gradient accumulation
    config.train.row_length = 0  # 0 = smallest multiple of 64 holding the longest example
    config.train.max_tokens = 512
    config.train.learning_rate = 2e-5
    config.train.warmup_steps = 2
    config.train.end_learning_rate = 0.1  # fraction of the peak at the last step
    config.train.weight_decay = 0.0
    config.train.b1 = 0.9
    config.train.b2 = 0.999
    config.train.eps = 1e-8
    config.train.clip_norm = 1.0
    # Compute dtype (auto: float32 on CPU, bfloat16 on GPU/TPU); master weights and optimizer state stay float32.
    config.train.dtype = "auto"
    config.train.seed = 0  # data order
    config.train.eos = True
    config.train.bos = True
    config.train.lm_head_tokens = 1024
    # Shard parameters, gradients and optimizer state over the data axis too; auto = when the replicated
    # state (16 bytes a parameter) would not fit a device (never on CPU).
    config.train.fsdp = "auto"
    config.train.remat = (
        "auto"  # recompute decoder layers in the backward: auto (none on CPU, full on GPU/TPU) | none | full | dots
    )
    config.train.checkpoint_every = 8
    config.train.keep_checkpoints = 1

    # The training mesh (data, model): mesh.model devices of a host split each layer (tensor parallel,
    # the scoring sharding table); the rest split the rows (data parallel, FSDP when on).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.model = 1
    # Multi-process runs (TPU pods, multi-host GPU): the same fields as the scoring job's.
    config.distributed = ml_collections.ConfigDict(config.score.distributed.to_dict())

    config.eval = ml_collections.ConfigDict()
    # "default" = generated held-out tasks (synthetic.generate_tasks(size, seed)), disjoint from the
    # pool by construction and with the scoring task set removed; or a .json/.jsonl path
    # (input format, Self-Instruct user-oriented tasks, or AlpacaEval outputs).
    config.eval.set = "default"
    config.eval.format = "auto"  # auto | records | sinstruct | alpaca_eval
    config.eval.size = 200
    config.eval.seed = 7
    config.eval.max_examples = 0  # first N examples only (0 = all)
    config.eval.max_tokens = 512

    config.fresh = False  # delete checkpoints of a run whose inputs or settings changed
    config.progress = True

    if arg.runlocal:
        config.random_seeds = (0,)
        config.top_k = 4
        config.train.steps = 2
        config.train.batch_rows = 2
        config.train.warmup_steps = 1
        config.train.checkpoint_every = 2
        config.eval.size = 12
    return config
