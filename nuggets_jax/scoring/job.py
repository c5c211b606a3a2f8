"""The scoring job: a config in, a workdir out (docs/ARCHITECTURE.md, "The workdir of a scoring run").

`run_score` resolves the config once into a `ScoreSpec` (validated before any model is loaded),
then runs its phases in order: prepare the workdir, load the inputs, load the model and check the
fingerprint (a workdir never mixes scores of different inputs), tokenize, build the engine, the
zero-shot pass, the candidates (exact, or adaptive rounds), and process 0 writes config.json,
scores.npz, ranking.jsonl, golden.json, run.json (`run_info.RunInfo`) and report.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import metrics as metrics_lib
from nuggets_jax import select as select_lib
from nuggets_jax import sharding, synthetic
from nuggets_jax import store as store_lib
from nuggets_jax.errors import UserError
from nuggets_jax.scoring import run_info
from nuggets_jax.scoring.adaptive.config import AdaptiveConfig
from nuggets_jax.scoring.baselines import BaselineConfig

if TYPE_CHECKING:  # imported with the model code, in `validate`
    from nuggets_jax.scoring.engine import EngineConfig


class JobError(UserError):
    """A user mistake in the config or workdir; the message says what to change."""


class WorkdirMismatchError(JobError):
    """The workdir holds scores of other inputs (model, pool, tasks, template or token policy)."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Validated records plus what identifies them for the fingerprint."""

    pool: list[data_lib.Record]
    tasks: list[data_lib.Record]
    pool_source: str
    tasks_source: str
    pool_digest: str
    tasks_digest: str
    pool_kind: str = "generated"  # generated | json | jsonl | parquet | hf (data.files.file_kind)
    tasks_kind: str = "generated"
    skipped: tuple[str, ...] = ()  # records left out for an empty response (data.skip_empty), where they are


def token_policy(config) -> data_lib.TokenPolicy:
    """The config's preset with any `data.*` override applied."""
    return data_lib.token_policy(config.preset, config.data)


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """What a scoring config determines, resolved and validated once (`validate`).

    Attributes:
      policy: the token policy (preset plus `data.*` overrides).
      template: the text template; None under data.template=chat (the tokenizer's, `template_for`).
      selection: the rule that picks the golden set.
      engine: the batching knobs (`scoring.*`).
      adaptive: the adaptive settings (also read in exact mode, to complete an adaptive workdir).
      mode: "exact" or "adaptive".
      metric: the ranking metric: a Nuggets metric (`metrics.METRICS`) or a baseline
        (`metrics.BASELINES`: one pass per candidate, no task set).
      baselines: the baseline settings (`baselines.*`).
    """

    policy: data_lib.TokenPolicy
    template: data_lib.Template | None
    selection: select_lib.SelectionRule
    engine: EngineConfig
    adaptive: AdaptiveConfig
    mode: str
    metric: str
    baselines: BaselineConfig = BaselineConfig()

    @property
    def nuggets(self) -> bool:
        """Whether the run scores the pool against the task set (not for a baseline metric)."""
        return self.metric not in metrics_lib.BASELINES

    @property
    def with_baselines(self) -> bool:
        """Whether the run makes the baseline pass (a baseline metric, or `baselines.compute`)."""
        return not self.nuggets or self.baselines.compute


def mesh_degree(config) -> int:
    """The config's `mesh.model` (configs written before the field: 1)."""
    return int(config.mesh.model) if "mesh" in config else 1


def make_mesh(config, dtype: str, log: Callable[[str], None]):
    """The (data, model) mesh of `mesh.model`; 0 = the smallest degree the parameters fit at."""
    import jax

    from nuggets_jax import models
    from nuggets_jax.scoring import memory

    degree = mesh_degree(config)
    if degree == 0:
        model_config = models.ModelConfig.from_file(models.resolve_model_dir(config.model.path) / "config.json")
        limit = memory.device_memory(override_gib=config.scoring.device_memory_gib)
        degree = memory.fit_degree(model_config, models.DTYPES[dtype], limit, jax.local_device_count())
        log(f"mesh: mesh.model=0 -> model-parallel degree {degree}")
    return sharding.make_mesh(degree)


def cpu_devices(config) -> tuple[int, str]:
    """XLA:CPU devices for `mesh.cpu_devices` and why: 0 = auto, one per usable core on one
    process (about 20% faster than one device spreading every op over the cores, BENCHMARKS.md
    section 1), fewer when that many copies of the parameters would take over half the host's
    memory (every device holds a copy). Read before the backend starts: the size is
    `memory.param_bytes` of its config.json (abstract shapes, no backend; float32 unless model.dtype
    says otherwise)."""
    setting = int(config.mesh.get("cpu_devices", 1)) if "mesh" in config else 1
    if setting:
        return setting, f"mesh.cpu_devices={setting}"
    if os.environ.get("JAX_NUM_CPU_DEVICES"):  # the user's own setting, read by JAX itself
        count = int(os.environ["JAX_NUM_CPU_DEVICES"])
        return count, f"JAX_NUM_CPU_DEVICES={count}"
    if config.distributed.enabled:
        return 1, "auto: one per process under jax.distributed"
    cores = sharding.usable_cores()
    why = f"auto: one per usable core ({cores})"
    try:
        import jax.numpy as jnp

        from nuggets_jax import models
        from nuggets_jax.scoring import memory

        model_config = models.ModelConfig.from_file(models.resolve_model_dir(config.model.path) / "config.json")
        copy = memory.param_bytes(model_config, models.DTYPES.get(config.model.dtype, jnp.float32), 1)
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (UserError, OSError, ValueError):  # a GGUF file or no config.json: the loader reports it
        return cores, why
    fit = max(1, int(host // (2 * copy)))
    if fit < cores:
        return fit, f"auto: {fit} of {cores} cores (each device holds a {copy / 2**30:.1f} GiB copy)"
    return cores, why


def data_form(config) -> dict[str, str]:
    """`data.format` and `data.template` (configs written before the fields: auto, text)."""
    return {key: config.data.get(key) or default for key, default in (("format", "auto"), ("template", "text"))}


def template_for(spec: ScoreSpec, tokenizer, model_path: str):
    """The spec's text template, or the tokenizer's chat template."""
    return spec.template or data_lib.ChatTemplate.of(tokenizer, model_path)


def validate(config) -> ScoreSpec:
    """Checks everything that can be checked before loading a model; returns the resolved spec."""
    known = (*metrics_lib.METRICS, *metrics_lib.BASELINES)
    if config.metric not in known:
        raise JobError(f"unknown metric {config.metric!r}; choose one of: {', '.join(known)}.")
    baselines = BaselineConfig.from_mapping(config.get("baselines"))
    from nuggets_jax.models import DTYPES
    from nuggets_jax.scoring.engine import EngineConfig

    if config.model.dtype not in (*DTYPES, "auto"):
        raise JobError(f"unknown model.dtype {config.model.dtype!r}; choose auto or one of: {', '.join(DTYPES)}.")
    if mesh_degree(config) < 0:
        raise JobError(
            f"mesh.model={mesh_degree(config)}: use 1 (data parallel), a model-parallel degree, or 0 (auto)."
        )
    policy = token_policy(config)
    selection = select_lib.SelectionRule.from_config(config.select)
    if config.scoring.candidates_per_device < 0 or config.scoring.tokens_per_device < 0:
        raise JobError("scoring.candidates_per_device and scoring.tokens_per_device must be >= 0 (0 = auto).")
    if config.scoring.mode not in ("exact", "adaptive"):
        raise JobError(f"unknown scoring.mode {config.scoring.mode!r}; choose exact or adaptive.")
    adaptive = AdaptiveConfig.from_mapping(config.adaptive)
    if config.scoring.mode == "adaptive":
        if baselines.compute:
            raise JobError(
                "baselines.compute=True needs scoring.mode=exact; compute the baselines in a run of their own "
                "(metric=ifd, perplexity, length or random)."
            )
        if config.metric not in metrics_lib.ADAPTIVE_METRICS:
            raise JobError(
                f"scoring.mode=adaptive supports metric {' | '.join(metrics_lib.ADAPTIVE_METRICS)}, "
                f"got {config.metric!r}."
            )
        if selection.diversity is not None:
            raise JobError("select.diversity needs scoring.mode=exact (the adaptive rule decides by score).")
        if (adaptive.panel or adaptive.compare == "pairwise") and selection.threshold is not None:
            raise JobError(
                "adaptive.panel and adaptive.compare=pairwise need select.top_n or select.top_fraction, "
                "not select.threshold."
            )
    if data_form(config)["format"] not in data_lib.FORMATS:
        raise JobError(f"unknown data.format {config.data.format!r}; choose one of: {', '.join(data_lib.FORMATS)}.")
    template = data_form(config)["template"]
    return ScoreSpec(
        policy=policy,
        template=data_lib.Template.from_config(config.data) if template == "text" else None,
        selection=selection,
        engine=EngineConfig(**{f.name: config.scoring[f.name] for f in dataclasses.fields(EngineConfig)}),
        adaptive=adaptive,
        mode=config.scoring.mode,
        metric=config.metric,
        baselines=baselines,
    )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_inputs(config, workdir: pathlib.Path) -> Inputs:
    """Reads (or generates) pool and task set, applies the limits, validates every record."""

    def load(spec: str, role: str, generate):
        if spec == "default":
            objects = generate()
            source = f"<generated {role}: nuggets_jax.synthetic>"
            if os.environ.get("NUGGETS_KEEP_DEFAULT_DATA", "1") == "1" and sharding.is_main():
                path = workdir / "data" / f"{role}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                store_lib.atomic_write_bytes(path, json.dumps(objects, ensure_ascii=False, indent=1).encode())
            records = data_lib.records_from_objects(
                [(f"{source}[{i}]", o) for i, o in enumerate(objects)], source, role, data_form(config)["format"]
            )
            return records, source, _digest(objects)
        path = pathlib.Path(spec).expanduser()
        records = data_lib.read_records(path, role, data_form(config)["format"], skipped)
        return records, str(path), data_lib.files.digest(path)

    skipped: list[str] | None = [] if config.data.get("skip_empty", False) else None

    pool, pool_source, pool_digest = load(config.data.pool, "pool", synthetic.generate_pool)
    tasks, tasks_source, tasks_digest = load(config.data.tasks, "tasks", synthetic.generate_tasks)
    if config.data.max_candidates:
        pool = pool[: config.data.max_candidates]
    if config.data.max_tasks:
        tasks = tasks[: config.data.max_tasks]
    if len(tasks) > config.data.task_set_limit:
        raise JobError(
            f"{tasks_source}: {len(tasks)} tasks is more than data.task_set_limit={config.data.task_set_limit} "
            f"(cost grows as pool x tasks); use data.max_tasks to take the first N, or raise the limit."
        )
    if data_form(config)["template"] == "text":
        for records, source in ((pool, pool_source), (tasks, tasks_source)):
            chat = next((r for r in records if r.format != "alpaca"), None)
            if chat is not None:
                raise JobError(
                    f"{source}: record {chat.id!r} is a conversation ({chat.format}); the text template reads "
                    "instruction/input/output only. Set data.template=chat to score it under the model's chat template."
                )
    kinds = [
        "generated" if spec == "default" else data_lib.files.file_kind(pathlib.Path(spec).expanduser())
        for spec in (config.data.pool, config.data.tasks)
    ]
    return Inputs(pool, tasks, pool_source, tasks_source, pool_digest, tasks_digest, *kinds, tuple(skipped or ()))


def fingerprint(
    config, inputs: Inputs, model_fingerprint: str, policy: data_lib.TokenPolicy, dtype: str, template
) -> dict[str, Any]:
    """Everything that determines the scores; a resumed run must match it exactly."""
    return {
        "model": model_fingerprint,
        "dtype": dtype,
        "pool": inputs.pool_digest,
        "max_candidates": config.data.max_candidates,
        "tasks": inputs.tasks_digest,
        "max_tasks": config.data.max_tasks,
        "template": template.describe(),
        "policy": dataclasses.asdict(policy),
        "format": [data_form(config)["format"], inputs.pool_kind, inputs.tasks_kind],
        **({"skip_empty": True} if config.data.get("skip_empty", False) else {}),  # only when set: older runs resume
    }


def check_fingerprint(workdir: pathlib.Path, current: dict[str, Any], fresh: bool, store) -> None:
    """Refuses to mix scores of different inputs in one workdir (unless `fresh`: start over)."""
    path = workdir / "fingerprint.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if changed and not fresh:
            n = len(store.every_process_names())
            raise WorkdirMismatchError(
                f"{workdir}: holds scores of a different run ({n} saved chunk(s)); changed: {', '.join(changed)}. "
                "Use another --workdir, or add --config.fresh=True to discard the saved scores and start over."
            )
        if changed:
            store.clear()
    if sharding.is_main():
        store_lib.atomic_write_bytes(path, json.dumps(current, indent=2, ensure_ascii=False).encode())


def prepare_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
    """Creates the workdir; refuses one that cannot be written."""
    workdir = pathlib.Path(workdir).expanduser()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"{workdir}: cannot create the workdir ({e.strerror}); choose a writable --workdir.") from None
    if not os.access(workdir, os.W_OK):
        raise JobError(f"{workdir}: not writable; choose a writable --workdir.")
    return workdir


def run_score(config, workdir: str | pathlib.Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the whole scoring job and returns run.json's content."""
    spec = validate(config)
    cpu_count, cpu_why = cpu_devices(config)
    cpu_applied = sharding.set_cpu_devices(cpu_count)
    sharding.initialize(sharding.DistributedConfig(**config.distributed.to_dict()))
    import jax

    from nuggets_jax import models

    if spec.selection.diversity is not None and jax.process_count() > 1:
        raise JobError(
            "select.diversity needs a single-process run for now (process 0 embeds the shortlist); "
            "leave it at 0 for a multi-process run."
        )
    t_start, timings = time.perf_counter(), run_info.Timings()
    workdir = prepare_workdir(workdir)
    store = store_lib.ScoreStore(workdir, jax.process_index())
    inputs = load_inputs(config, workdir)
    if inputs.skipped:
        log(
            f"data: left out {len(inputs.skipped)} record(s) with an empty response (data.skip_empty), "
            f"first {', '.join(inputs.skipped[:3])}"
        )
    dtype = models.resolve_dtype(config.model.dtype, jax.default_backend())
    traffic_start = sum(sharding.TRAFFIC.values())
    with timings.timed("load_s"):
        mesh = make_mesh(config, dtype, log)
        loaded = models.load_model(config.model.path, dtype=dtype, mesh=mesh)
    if loaded.model.config.num_kv_heads != loaded.config.num_kv_heads:
        log(
            f"mesh: KV heads replicated {loaded.config.num_kv_heads} -> {loaded.model.config.num_kv_heads} "
            f"so the attention splits over mesh.model={sharding.model_size(mesh)}"
        )
    template = template_for(spec, loaded.tokenizer, config.model.path)
    current = fingerprint(config, inputs, models.model_fingerprint(loaded.model_dir), spec.policy, dtype, template)
    check_fingerprint(workdir, current, config.fresh, store)
    if sharding.is_main():
        store_lib.atomic_write_bytes(workdir / "config.json", config.to_json(indent=2).encode())
    with timings.timed("tokenize_s"):
        tasks, prefixes = tokenize(loaded.tokenizer, inputs, spec, template, log) if spec.nuggets else (None, None)
        seqs = None
        if spec.with_baselines:
            from nuggets_jax.scoring import baselines

            seqs = baselines.sequences(loaded.tokenizer, inputs.pool, template, spec.policy, inputs.pool_source)
            if seqs.unscorable:
                shown = ", ".join(repr(i) for i in seqs.unscorable[:5]) + (" ..." if len(seqs.unscorable) > 5 else "")
                log(
                    f"baselines: {len(seqs.unscorable)} candidate(s) whose prompt fills "
                    f"data.max_task_tokens={spec.policy.max_task_tokens} have no perplexity or IFD "
                    f"(they rank last on those; raise it to score them): ids {shown}"
                )
    engine = partial = base_engine = None
    if spec.nuggets:
        engine, partial = build_engine(spec, loaded.model, tasks, prefixes, store, log, mesh)
    if seqs is not None:
        base_engine = baselines.build_engine(loaded.model, seqs, spec.baselines, spec.engine, mesh, log)
    traffic = {"load_and_build": sum(sharding.TRAFFIC.values()) - traffic_start}
    traffic_before = dict(sharding.TRAFFIC)
    timings.compile_s = sum(e.compile_s for e in (engine, base_engine) if e is not None)
    compiles = _CompileCounter()
    candidate_ids = [r.id for r in inputs.pool]
    task_ids = [r.id for r in inputs.tasks] if spec.nuggets else []
    zero_stats = one = rule = base = None
    if spec.nuggets:
        zero_logp, zero_correct, zero_stats = zero_shot(engine, prefixes, store, task_ids)
        timings.zero_shot_s = zero_stats.wall_s
        shared = dict(chunk_candidates=config.scoring.chunk_candidates, progress=config.progress, log=log)
        if spec.mode == "adaptive":
            from nuggets_jax.scoring.adaptive import rounds as adaptive
            from nuggets_jax.scoring.adaptive.rule import Rule

            rule = Rule.from_selection(spec.selection, len(candidate_ids))
            one = adaptive.run_adaptive(
                engine, prefixes, store, candidate_ids, task_ids, zero_logp, zero_correct, tasks.n_tokens,
                spec.metric, rule, spec.adaptive, **shared,
            )  # fmt: skip
        else:
            one = score_exact(spec, engine, prefixes, store, candidate_ids, task_ids, partial, shared)
        timings.one_shot_s = one.stats.wall_s
    if seqs is not None:
        base = baselines.run_baselines(base_engine, seqs, store, spec.baselines, progress=config.progress)
        timings.baselines_s = base.stats.wall_s

    records = [{**r.raw, "id": r.raw.get("id", r.position)} for r in inputs.pool]
    selected, adaptive_summary = None, {}
    compiled_after_warmup = compiles.count  # the diversity step's embedding programs come after
    compiles.close()

    def embed(indices: np.ndarray) -> np.ndarray:  # [M] pool indices -> [M, D]
        from nuggets_jax.scoring import embedding

        log(f"select: embedding the {len(indices)} shortlisted candidates for the diversity-aware golden set")
        return embedding.embed_records(loaded.model, loaded.tokenizer, [inputs.pool[i] for i in indices], template)[0]

    with timings.timed("write_s"):
        if sharding.is_main():
            scores = None
            if spec.nuggets:
                scores = {
                    "zero_logp": zero_logp.astype(np.float32),
                    "zero_correct": zero_correct.astype(np.int32),
                    "n_tokens": tasks.n_tokens.astype(np.int32),
                    "one_logp": one.one_logp,
                    "one_correct": one.one_correct,
                    "candidate_ids": np.asarray(candidate_ids),
                    "task_ids": np.asarray(task_ids),
                }
            source = None if config.data.pool == "default" else inputs.pool_source
            selected, adaptive_summary = write_outputs(
                workdir, spec, scores, records, one, rule, source=source,
                baselines=base.arrays if base else None, embed=embed,
            )  # fmt: skip

    # Throughputs: of the Nuggets passes, or of the baseline pass in a baseline run.
    from nuggets_jax.scoring.engine import PassStats

    passes = [zero_stats, one.stats] if spec.nuggets else [base.stats]
    busy = max(sum(p.wall_s for p in passes), 1e-9)
    shown = engine or base_engine
    run = run_info.RunInfo(
        devices={**run_info.devices(), "cpu_devices": run_info.cpu_choice(cpu_count, cpu_why, cpu_applied)},
        model=run_info.model_info(config.model, loaded.model_dir, shown.state, dtype),
        mesh=dict(shown.mesh.shape),
        param_bytes_per_device=shown.param_bytes_per_device,
        program_bytes_per_device=max(e.program_bytes for e in (engine, base_engine) if e is not None),
        host_traffic={**traffic, **{k: v - traffic_before.get(k, 0) for k, v in sharding.TRAFFIC.items()}},
        counts=run_info.Counts.of(len(candidate_ids), len(task_ids), selected),
        timings=timings,
        zero_shot=(zero_stats or PassStats()).as_dict(),
        one_shot=(one.stats if one else PassStats()).as_dict(),
        tokens_per_s=sum(p.task_tokens for p in passes) / busy,
        pairs_per_s=sum(p.pairs for p in passes) / busy,
        flops_per_s=sum(p.flops for p in passes) / busy,
        wall_s=time.perf_counter() - t_start,
        programs_compiled=sum(e.programs for e in (engine, base_engine) if e is not None),
        compiles_after_warmup=compiled_after_warmup,
        buckets=run_info.engine_shapes(shown),
        cuts=run_info.Cuts.of(prefixes, tasks, spec.policy)
        if spec.nuggets
        else run_info.Cuts.of_baselines(seqs, spec.policy),
        resumed_candidates=one.resumed_candidates if one else base.resumed_candidates,
        selection=spec.selection.as_dict(),
        mode=spec.mode if spec.nuggets else "baselines",
        **{key: adaptive_summary.get(key) for key in run_info.ADAPTIVE_ONLY},
        baselines=base.stats.as_dict() if base else None,
        diversity=dataclasses.asdict(spec.selection.diversity) if spec.selection.diversity else None,
        jax=jax.__version__,
    ).as_dict()
    if sharding.is_main():
        store_lib.atomic_write_bytes(workdir / "run.json", json.dumps(run, indent=2).encode())
        if config.report:
            from nuggets_jax.scoring import report

            report.write_report(workdir, records=records, metric=spec.metric)
    return run


def tokenize(tokenizer, inputs: Inputs, spec: ScoreSpec, template, log: Callable[[str], None]):
    """The task set and the pool as token ids under the template and the spec's token policy."""
    policy = spec.policy
    tasks = data_lib.tokenize_tasks(tokenizer, inputs.tasks, template, policy, inputs.tasks_source)
    prefixes = data_lib.tokenize_prefixes(tokenizer, inputs.pool, template, policy, inputs.pool_source)
    log(
        f"data: {len(inputs.pool)} candidates ({_cuts(prefixes.cut, policy.max_prefix_tokens)}), "
        f"{len(inputs.tasks)} tasks ({_cuts(tasks.cut, policy.max_task_tokens)}), "
        f"{int(tasks.n_tokens.sum())} response tokens scored per candidate"
    )
    return tasks, prefixes


def _cuts(cut: np.ndarray, limit: int | None) -> str:
    """ "3 cut at 512 tokens", or "not cut" when there is no limit."""
    return "not cut" if limit is None else f"{int(cut.sum())} cut at {limit} tokens"


def build_engine(spec: ScoreSpec, model, tasks, prefixes, store: store_lib.ScoreStore, log, mesh=None):
    """The engine, and whether the store holds an adaptive run's partially scored candidates.

    The adaptive round layouts are compiled for an adaptive run, and for completing one (its
    partial candidates) into an exact run.
    """
    from nuggets_jax.scoring import engine as scoring
    from nuggets_jax.scoring.adaptive import rounds as adaptive
    from nuggets_jax.scoring.adaptive.config import round_columns

    partial = bool(store.names(adaptive.CHUNK_PREFIX))
    column_sets = round_columns(len(tasks.ids), spec.adaptive) if spec.mode == "adaptive" or partial else ()
    lengths = scoring.prefix_lengths_of(prefixes)
    engine = scoring.Engine(model, tasks, lengths, spec.engine, mesh=mesh, log=log, column_sets=column_sets)
    return engine, partial


def zero_shot(engine, prefixes, store: store_lib.ScoreStore, task_ids):
    """zero_logp [T], zero_correct [T] (read back when stored) and what this call computed."""
    from nuggets_jax.scoring import engine as scoring
    from nuggets_jax.scoring.blocks import check_finite

    if store.has("zero"):
        zero = store.read("zero")
        return zero["zero_logp"], zero["zero_correct"], scoring.PassStats()
    zero_logp, zero_correct, stats = engine.zero_shot(prefixes.zero_shot)
    check_finite(zero_logp[None], ["<zero-shot>"], task_ids)
    store.write("zero", zero_logp=zero_logp, zero_correct=zero_correct)
    return zero_logp, zero_correct, stats


def score_exact(spec: ScoreSpec, engine, prefixes, store, candidate_ids, task_ids, partial: bool, shared):
    """Every candidate on every task; an adaptive run's partial candidates first get their missing rounds."""
    from nuggets_jax.scoring import engine as scoring
    from nuggets_jax.scoring import one_shot
    from nuggets_jax.scoring.adaptive import rounds as adaptive

    completed = scoring.PassStats()
    if partial:
        completed = adaptive.complete(engine, prefixes, store, candidate_ids, task_ids, spec.adaptive, **shared)
    one = one_shot.run_one_shot(engine, prefixes, store, candidate_ids, task_ids, **shared)
    for field in ("wall_s", "calls", "pairs", "task_tokens", "scored_tokens", "flops"):
        setattr(one.stats, field, getattr(one.stats, field) + getattr(completed, field))
    return one


def write_outputs(
    workdir: pathlib.Path, spec: ScoreSpec, scores, records, one, rule, source=None, baselines=None, embed=None
) -> tuple[np.ndarray, dict]:
    """scores.npz (a Nuggets run), baselines.npz (with the baselines), ranking.jsonl and the golden
    set (adaptive: and adaptive.jsonl); returns the golden set and, in adaptive mode, run.json's
    additions (`rounds.summary`).

    The golden set is written in the pool's format (`select.write_golden_as`; `source` is the pool
    path, None for a generated pool: golden.json), with ranking.parquet for a Parquet or datasets pool.
    The ranking holds every Nuggets metric, then every baseline score (`metrics.BASELINES`) when
    the baseline pass ran. A diversity-aware rule gets its shortlist's embeddings from `embed`
    (pool indices -> [M, D])."""
    if scores is not None:
        store_lib.write_npz(workdir / "scores.npz", scores)
    values = {}
    if baselines is not None:
        values = metrics_lib.baseline_scores(baselines, spec.baselines.seed, spec.baselines.ifd_max)
        store_lib.write_npz(workdir / "baselines.npz", {**baselines, **values})
    if spec.mode == "adaptive":
        from nuggets_jax.scoring.adaptive import rounds as adaptive

        # Golden set, ranking and intervals from the decisions (scores.npz has NaN for pairs never scored).
        summary = adaptive.write_outputs(
            workdir, records, one.decisions, spec.metric, spec.adaptive, rule, source=source
        )
        return one.decisions.selected, summary
    if scores is not None:
        values = {**metrics_lib.compute_all(scores), **values}
    select_lib.write_ranking(workdir / "ranking.jsonl", records, values, spec.metric)
    select_lib.write_ranking_table(workdir, source, records, values, spec.metric)
    rank_values = values[spec.metric]
    shortlist = spec.selection.shortlist(rank_values) if spec.selection.diversity else None
    selected = spec.selection.select(rank_values, None if shortlist is None else embed(shortlist))
    select_lib.write_golden_as(workdir, source, records, selected, values, spec.metric)
    return selected, {}


class _CompileCounter:
    """Counts XLA compilations from now on (the scoring loop must cause none)."""

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.count = 0
        self._active = True

        def listener(event: str, duration: float, **kwargs) -> None:
            if self._active and event == self._EVENT:
                self.count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)

    def close(self) -> None:
        self._active = False
