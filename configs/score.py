"""Scoring config: `python -m experiments.score --config=configs/score.py[:ARGS] --workdir=DIR`.

ARGS (comma separated): `preset=default|original`, `runlocal` (a tiny run in seconds),
`adaptive=safe|fast` (scoring.mode=adaptive; safe: every in/out decision holds together at the
confidence; fast: the per-candidate pairwise rule in small rounds, about 30% of the pairs for 0.95
recall of the exact top 10% in the README's experiment, no joint guarantee).
Every field below can be overridden on the command line, e.g. `--config.model.path=/models/llama`,
`--config.data.pool=pool.jsonl`, `--config.select.top_fraction=0.1`.
"""

import ml_collections
from ml_collections import config_dict

from configs import common
from nuggets_jax import data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, preset="default", runlocal=False, adaptive="")
    config = ml_collections.ConfigDict()

    # "default" (shared special-token policy, "\n\n" separator, 512-token cuts) or "original"
    # (the original repository: no separator, zero-shot without special tokens, tasks cut at 200).
    config.preset = arg.preset
    # Ranking metric: win_rate | mean_logp_gain | mean_ppl_drop | token_acc_gain (Nuggets, against the
    # task set), or a baseline: perplexity | ifd | response_ppl | length | random (one pass per
    # candidate, no task set; see `baselines` below).
    config.metric = "win_rate"
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.path = "default"  # "default" | HF dir | file.gguf | org/name (hub)
    config.model.dtype = "auto"  # auto = float32 on CPU, bfloat16 on TPU/GPU | float32 | bfloat16 | float16

    # The device mesh (data, model): candidates split over `data`, the parameters over `model`
    # (tensor parallel, nuggets_jax.sharding.PARAM_RULES). 1 = every device holds the whole model;
    # 0 = the smallest degree at which the parameters fit the device's memory.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.model = 1
    # XLA:CPU devices of a CPU run (must be set before JAX starts): 0 = auto, one per usable core
    # (fewer if that many copies of the model would not fit the host's memory); 1 = one device on
    # every core. No effect on GPUs/TPUs.
    config.mesh.cpu_devices = 0

    config.data = ml_collections.ConfigDict()
    config.data.pool = "default"  # .json/.jsonl; "default" = the generated pool (nuggets_jax.synthetic)
    config.data.tasks = "default"  # the predefined task set; "default" = generated held-out tasks
    config.data.max_candidates = 0  # score only the first N candidates (0 = all)
    # Leave out pool and task records whose response (or an assistant turn) is empty, instead of
    # stopping at the first with an error; the log names them.
    config.data.skip_empty = False
    # Record form of pool and tasks: auto (per file, from the first record) | alpaca | messages | sharegpt.
    config.data.format = "auto"
    # "text": the prompt template below (the paper's); "chat": the model's own chat template, each
    # assistant turn scored (its content and the end-of-turn text the template writes after it).
    config.data.template = "text"
    config.data.score_turns = "all"  # chat: "all" assistant turns of a task are scored, or the "last" only
    # The paper's prompt template (nuggets_jax.data.Template); override both to change it.
    config.data.prompt_no_input = data.Template.prompt_no_input
    config.data.prompt_with_input = data.Template.prompt_with_input
    # Preset values unless set here.
    config.data.separator = config_dict.placeholder(str)
    config.data.max_prefix_tokens = config_dict.placeholder(int)
    config.data.max_task_tokens = config_dict.placeholder(int)
    config.data.max_tasks = 0  # use only the first N tasks (0 = all)
    config.data.task_set_limit = 1000  # refuse larger task sets (cost is |pool| x |tasks|)

    config.select = ml_collections.ConfigDict()
    config.select.top_n = config_dict.placeholder(int)
    config.select.top_fraction = config_dict.placeholder(float)  # default rule when none is set: 0.1
    config.select.threshold = config_dict.placeholder(float)
    # Diversity-aware golden set (top_n / top_fraction): the trade-off of spread (model embeddings of
    # the candidates) against score, in (0, 1]; 0 = by score only. Picks come from the best
    # diversity_shortlist x N by score, greedily: k_center (distance to the nearest pick) or
    # facility_location (coverage gain).
    config.select.diversity = 0.0
    config.select.diversity_method = "k_center"
    config.select.diversity_shortlist = 4.0

    config.scoring = ml_collections.ConfigDict()
    # "exact": every candidate on every task. "adaptive": rounds of tasks only for the candidates whose
    # place in the golden set is still undecided (config.adaptive); the golden set from fewer pairs.
    config.scoring.mode = "exact"
    # Candidates per device in one call; 0 = auto: one when a candidate's tasks fill a call, more
    # when they are short (as many as tokens_per_device holds).
    config.scoring.candidates_per_device = 0
    config.scoring.tokens_per_device = 0  # 0 = auto: 2048 on CPU, 16384 on GPU/TPU
    config.scoring.row_length = 0  # 0 = auto (fewest rows of at most tokens_per_device tokens)
    config.scoring.max_prefix_buckets = 4
    config.scoring.lm_head_tokens = 0  # 0 = auto: 2048 on CPU, 1024 on GPU/TPU
    config.scoring.lm_head_vocab_tile = 0  # 0 = auto: 1024 on CPU, the whole vocabulary on GPU/TPU
    config.scoring.attention_queries = 0  # task-window queries per attention step; 0 = auto: 128 on CPU, all on GPU/TPU
    config.scoring.attention_block = 0  # causal query block in a task window; 0 = auto: 64 on CPU, whole on GPU/TPU
    config.scoring.max_window_widths = 4  # task-window widths (each task attends inside the narrowest that holds it)
    config.scoring.chunk_candidates = 32  # candidates per saved chunk
    # Memory a device may use (GiB); 0 = what the runtime reports (none on CPU). With tokens_per_device=0
    # the rows are halved until the compiled programs fit in it.
    config.scoring.device_memory_gib = 0.0

    # scoring.mode="adaptive" (nuggets_jax.scoring.adaptive). Metrics: win_rate | mean_logp_gain | token_acc_gain.
    config.adaptive = ml_collections.ConfigDict()
    config.adaptive.confidence = 0.9  # P(all in/out decisions right) if union, else per candidate
    config.adaptive.union = True  # False: no joint guarantee, far fewer pairs (see the README)
    config.adaptive.interval = "betting"  # "betting" (exact) | "normal" (Student-t, approximate, tighter)
    config.adaptive.panel = 0  # reference candidates scored every round; intervals relative to them
    config.adaptive.compare = "candidate"  # "candidate" | "pairwise" (normal only: difference of two candidates)
    config.adaptive.initial_tasks = 10  # tasks every candidate gets before the first decision
    config.adaptive.tasks_per_round = 10  # tasks per round for the undecided candidates
    config.adaptive.seed = 0  # the task permutation the rounds follow
    config.adaptive.grid = 201  # hypothesised means per betting interval (resolution of its ends)
    config.adaptive.range_margin = 0.5  # mean_logp_gain: widening of the observed per-task range

    # Baseline scores (nuggets_jax.metrics.BASELINE_FORMULAS): each candidate's response scored after
    # its prompt and alone, with the same model and engine. Computed when the metric is one of them.
    config.baselines = ml_collections.ConfigDict()
    config.baselines.compute = False  # also in a Nuggets run: extra columns in ranking.jsonl and the report
    config.baselines.seed = 0  # the `random` baseline
    config.baselines.ifd_max = 1.0  # IFD at or above it -> NaN, ranked last (Cherry_LLM's filter); inf = keep all
    config.baselines.chunk_records = 1024  # candidates per saved chunk of the pass

    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = False  # jax.distributed.initialize() (automatic on TPU pods / SLURM)
    config.distributed.coordinator = config_dict.placeholder(str)
    config.distributed.num_processes = config_dict.placeholder(int)
    config.distributed.process_id = config_dict.placeholder(int)

    config.fresh = False  # discard chunks of an earlier run whose inputs differ
    config.progress = True
    config.report = True

    if arg.adaptive not in ("", "safe", "fast"):
        raise ValueError(f"unknown adaptive={arg.adaptive!r}; use adaptive=safe or adaptive=fast")
    if arg.adaptive:
        config.scoring.mode = "adaptive"
    if arg.adaptive == "fast":
        config.adaptive.update(interval="normal", union=False, compare="pairwise", initial_tasks=6, tasks_per_round=4)
    if arg.runlocal:
        config.data.max_candidates = 16
        config.data.max_tasks = 4
        config.scoring.chunk_candidates = 8
    return config
