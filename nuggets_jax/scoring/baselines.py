"""Baseline scorers: one pass per candidate with the same model and engine, no task set.

Each candidate's response is scored twice by the engine's zero-shot pass (docs/ARCHITECTURE.md,
"Baseline scorers"), under the run's template and token policy:
- after its own prompt: the zero-shot sequence the record would be as a task (`data.tokenize_tasks`,
  cut at `max_task_tokens`, after the leading special tokens when the policy's `zero_shot_special`);
  `cond_logp` sums its scored response tokens (`cond_tokens`). A candidate whose prompt fills
  `max_task_tokens` has no response token to score: it gets NaN perplexity, IFD and response_ppl
  (rank last, never selected), and the job names it;
- alone: the same scored tokens after the tokenizer's leading special tokens (e.g. [BOS]); with
  none, the first response token is context only. `resp_logp` sums them (`resp_tokens`).

From these `metrics.baseline_scores` computes `perplexity` (after the prompt), `ifd`
(PPL(response | prompt) / PPL(response), Cherry_LLM's instruction-following difficulty; NaN at or
above `ifd_max`, so those rank last), `response_ppl` (alone), `length` (response tokens before
any cut) and `random` (seeded): `metrics.BASELINE_FORMULAS`. Each ranks highest first, like the
Nuggets metrics.

The pass runs in chunks of `chunk_records` candidates, each a column subset of one compiled
engine (`Engine(column_sets=...)`), saved as store chunks "baselines-NNNNNN", so a killed run
resumes where it stopped and large pools never hold more than a chunk's rows on the devices.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import metrics as metrics_lib
from nuggets_jax.errors import UserError
from nuggets_jax.store import ScoreStore

if TYPE_CHECKING:  # the engine (and JAX) load when the pass runs, not when the job reads its config
    from nuggets_jax.scoring.engine import Engine, EngineConfig, PassStats

CHUNK_PREFIX = "baselines-"
# The pass's per-candidate arrays (baselines.npz; `metrics.baseline_scores` reads them).
ARRAYS = metrics_lib.BASELINE_ARRAYS


class BaselineError(UserError):
    """Baseline settings that cannot be used; the message names the field."""


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """The `baselines` config section.

    Attributes:
      compute: also compute the baselines in a Nuggets run (extra ranking columns); a run whose
        metric is a baseline computes them and nothing else.
      seed: the `random` baseline's seed.
      ifd_max: candidates whose IFD reaches it get NaN (rank last); inf keeps every ratio.
      chunk_records: candidates per pass chunk (saved as one store chunk).
    """

    compute: bool = False
    seed: int = 0
    ifd_max: float = 1.0
    chunk_records: int = 1024

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any] | None) -> BaselineConfig:
        config = dict(config.to_dict() if hasattr(config, "to_dict") else config or {})
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BaselineError(f"unknown baselines field(s) {', '.join(unknown)}.")
        out = cls(**config)
        if out.chunk_records < 1:
            raise BaselineError(f"baselines.chunk_records must be at least 1, got {out.chunk_records}.")
        if not out.ifd_max > 0:
            raise BaselineError(f"baselines.ifd_max must be positive (inf = no cut), got {out.ifd_max}.")
        return out


@dataclasses.dataclass(frozen=True)
class Sequences:
    """The sequences of the pass (2C at most): every candidate after its prompt, then every response alone.

    Attributes:
      tasks: the sequences as the engine's task set; column j < P is candidate `prompted[j]` after
        its prompt, column P + j the response of candidate `alone[j]` alone.
      prompted: [P] candidates with a response token inside `max_task_tokens` after their prompt
        (all but those in `unscorable`).
      alone: [A] candidates whose response keeps a scored token alone (all prompted ones, when the
        tokenizer has leading special tokens).
      length: [C] response tokens before the cut.
      unscorable: ids of the candidates whose prompt fills `max_task_tokens`.
    """

    tasks: data_lib.TokenizedTasks
    prompted: np.ndarray
    alone: np.ndarray
    length: np.ndarray
    unscorable: tuple[str, ...] = ()


def sequences(
    tokenizer, records: Sequence[data_lib.Record], template, policy: data_lib.TokenPolicy, source: str
) -> Sequences:
    """Tokenizes the pool for the pass (module docstring)."""
    unscorable: list[str] = []
    cut = data_lib.tokenize_tasks(tokenizer, records, template, policy, source, unscorable)
    left_out = set(unscorable)
    prompted = np.asarray([c for c, r in enumerate(records) if r.id not in left_out], np.int64)
    # The length is of the whole response: only the records the cut shortened (or left without a
    # response token) are tokenized again; a record with no prompt or no response is an error there.
    length = np.zeros(len(records), np.int64)
    length[prompted] = cut.n_tokens
    shortened = np.union1d(prompted[cut.cut], np.setdiff1d(np.arange(len(records)), prompted))
    if shortened.size:
        whole = data_lib.tokenize_tasks(
            tokenizer,
            [records[i] for i in shortened],
            template,
            dataclasses.replace(policy, max_task_tokens=1 << 30),
            source,
        )
        length[shortened] = whole.n_tokens
    lead = np.asarray(data_lib.leading_special_tokens(tokenizer), np.int32)
    # After its prompt, as the zero-shot sequence of the record as a task would be.
    first = lead if policy.zero_shot_special else lead[:0]
    ids = [np.concatenate([first, seq]) for seq in cut.ids]
    masks = [np.concatenate([np.zeros(first.size, bool), m]) for m in cut.scored_masks()]
    alone = []
    for c, seq, mask in zip(prompted, cut.ids, cut.scored_masks(), strict=True):
        response = np.concatenate([lead, seq[mask]])
        scored = np.arange(response.size) >= max(1, lead.size)
        if scored.any():
            alone.append(c)
            ids.append(response)
            masks.append(scored)
    n = np.asarray([int(m.sum()) for m in masks], np.int32)
    tasks = data_lib.TokenizedTasks(
        ids,
        np.asarray([int(np.argmax(m)) for m in masks], np.int32),
        n,
        np.concatenate([cut.cut, np.zeros(len(alone), bool)]),
        masks,
    )
    return Sequences(tasks, prompted, np.asarray(alone, np.int64), length, tuple(unscorable))


def chunk_columns(seqs: Sequences, chunk_records: int) -> list[np.ndarray]:
    """Per chunk of `chunk_records` candidates, its task columns: each candidate's two sequences
    (chunks whose candidates all have none are skipped)."""
    num = seqs.length.size
    where = np.full((2, num), -1, np.int64)
    where[0, seqs.prompted] = np.arange(seqs.prompted.size)
    where[1, seqs.alone] = seqs.prompted.size + np.arange(seqs.alone.size)
    out = []
    for start in range(0, num, chunk_records):
        members = where[:, start : start + chunk_records]
        columns = np.concatenate([members[0][members[0] >= 0], members[1][members[1] >= 0]])
        if columns.size:
            out.append(columns)
    return out


@dataclasses.dataclass
class BaselinePass:
    """The pass's per-candidate arrays (`ARRAYS`), its statistics and the engine it ran on."""

    arrays: dict[str, np.ndarray]
    stats: PassStats
    engine: Engine
    resumed_candidates: int


def build_engine(
    model, seqs: Sequences, config: BaselineConfig, engine_config: EngineConfig | None = None, mesh=None, log=print
) -> Engine:
    """The pass's engine: the 2C sequences as its task set, each chunk's columns as one layout."""
    from nuggets_jax.scoring.engine import Engine

    columns = chunk_columns(seqs, config.chunk_records)
    return Engine(
        model, seqs.tasks, [0], engine_config, mesh=mesh, log=log, column_sets=columns if len(columns) > 1 else ()
    )


def run_baselines(
    engine: Engine,
    seqs: Sequences,
    store: ScoreStore,
    config: BaselineConfig,
    progress: bool = True,
) -> BaselinePass:
    """Scores every chunk not yet in `store` on `engine` (`build_engine`); returns every candidate's arrays.

    Each chunk is one zero-shot pass of a column subset, its row groups dealt over every device;
    its log-likelihoods are saved as chunk "baselines-NNNNNN" with its columns.
    """
    from nuggets_jax.scoring.blocks import progress_bar
    from nuggets_jax.scoring.engine import PassStats, ScoringError

    num, prompted = seqs.length.size, seqs.prompted.size
    columns = chunk_columns(seqs, config.chunk_records)
    layouts = engine.subset_layouts or [engine.layout]
    logp = np.full(len(seqs.tasks.ids), np.nan, np.float64)
    done, stats = 0, PassStats()
    todo = []
    for i, cols in enumerate(columns):
        name = f"{CHUNK_PREFIX}{i:06d}"
        if store.has(name):
            saved = store.read(name)
            if np.array_equal(saved["columns"], cols):
                logp[cols] = saved["logp"]
                done += int(np.sum(cols < prompted))
                continue
        todo.append((i, name, cols))
    empty = np.zeros(0, np.int32)
    with progress_bar(prompted, done, progress, "baselines") as bar:
        bar.unit = "candidate"
        for i, name, cols in todo:
            t0 = time.perf_counter()
            pending = engine.dispatch_dealt([empty], layout=layouts[i])
            chunk_logp = engine.collect_dealt(pending, 1, layout=layouts[i])[0][0]
            engine.forget_dealt(layouts[i])
            values = chunk_logp[cols].astype(np.float64)
            bad = ~np.isfinite(values)
            if bad.any():
                first = int(cols[np.argmax(bad)])
                raise ScoringError(
                    f"non-finite log-probability in the baseline pass (sequence {first}); the model or its "
                    "dtype is broken for this input (try model.dtype=float32); finished chunks are kept."
                )
            store.write(name, columns=cols, logp=values)
            logp[cols] = values
            lengths = [len(seqs.tasks.ids[c]) for c in cols]
            stats.wall_s += time.perf_counter() - t0
            stats.calls += len(pending)
            stats.candidates += int(np.sum(cols < prompted))
            stats.pairs += cols.size
            stats.task_tokens += int(sum(lengths))
            stats.scored_tokens += int(seqs.tasks.n_tokens[cols].sum())
            stats.flops += engine.model_config.task_flops(0, lengths, seqs.tasks.n_tokens[cols])
            bar.update(int(np.sum(cols < prompted)))
    cond_logp, resp_logp = np.full(num, np.nan), np.full(num, np.nan)
    cond_tokens, resp_tokens = np.zeros(num, np.int64), np.zeros(num, np.int64)
    cond_logp[seqs.prompted] = logp[:prompted]
    cond_tokens[seqs.prompted] = seqs.tasks.n_tokens[:prompted]
    resp_logp[seqs.alone] = logp[prompted:]
    resp_tokens[seqs.alone] = seqs.tasks.n_tokens[prompted:]
    arrays = {
        "cond_logp": cond_logp,
        "cond_tokens": cond_tokens,
        "resp_logp": resp_logp,
        "resp_tokens": resp_tokens,
        "length": seqs.length,
    }
    return BaselinePass(arrays, stats, engine, done)
