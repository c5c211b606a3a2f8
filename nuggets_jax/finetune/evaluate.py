"""Held-out evaluation of fine-tuned models: response NLL / perplexity and win rate over the base model.

An evaluation set is records in the input format (instruction, input, output). Every example is
tokenized as in scoring and training (`[leading specials] prompt ++ response`, no eos) and the
model's log-likelihood of the response tokens given the prompt is summed per example, on the
scoring engine's packed, jitted, sharded zero-shot pass (`scoring.engine.Engine.zero_shot`). The
engine is compiled once; other parameter states of the same architecture reuse its programs.

- NLL per token: -sum of response log-probs / number of response tokens (over the whole set);
  perplexity = exp(NLL per token).
- Win rate of A over B: mean over examples of [NLL_A < NLL_B] + 1/2 [NLL_A == NLL_B].

Converters read two public evaluation sets into records: the Self-Instruct 252 user-oriented
tasks (`instruction` + `instances[0].input/output`) and AlpacaEval model outputs
(`instruction` + `output`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax.errors import UserError
from nuggets_jax.models.llama import Llama
from nuggets_jax.scoring import engine as scoring

EVAL_FORMATS = ("auto", "records", "sinstruct", "alpaca_eval")


class EvalError(UserError):
    """An evaluation set or model state that cannot be evaluated; the message says what to fix."""


# -- evaluation sets -----------------------------------------------------------------------------


def sinstruct_objects(objects: Sequence[tuple[str, Any]]) -> list[tuple[str, dict]]:
    """Self-Instruct user-oriented tasks -> records: instruction + the first instance's input/output.

    Every other field (id, motivation_app) is carried through.

    Args:
      objects: (where, object) pairs, from `data.read_objects`.
    Raises:
      EvalError: naming the line of a task without instances or without an output.
    """
    out = []
    for where, obj in objects:
        instances = obj.get("instances") if isinstance(obj, dict) else None
        if not instances or not isinstance(instances[0], dict) or "output" not in instances[0]:
            raise EvalError(f'{where}: a Self-Instruct task needs "instances": [{{"input": ..., "output": ...}}].')
        extra = {k: v for k, v in obj.items() if k not in ("instances", "input", "output")}
        first = instances[0]
        out.append((where, {**extra, "input": first.get("input") or "", "output": first["output"]}))
    return out


def alpaca_eval_objects(objects: Sequence[tuple[str, Any]]) -> list[tuple[str, dict]]:
    """AlpacaEval outputs (instruction, output, generator, dataset) -> records; the reference is `output`.

    Records whose output is empty are left out: they have no response to score.

    Args:
      objects: (where, object) pairs, from `data.read_objects`.
    Raises:
      EvalError: naming the record without an instruction or output field.
    """
    out = []
    for where, obj in objects:
        if not isinstance(obj, dict) or "instruction" not in obj or "output" not in obj:
            raise EvalError(f'{where}: an AlpacaEval record needs "instruction" and "output".')
        if isinstance(obj["output"], str) and not obj["output"].strip():
            continue
        out.append((where, {k: v for k, v in obj.items() if k != "input"}))
    return out


def read_eval_set(
    path: str | pathlib.Path, fmt: str = "auto", max_examples: int = 0, skipped: list[str] | None = None
) -> list[data_lib.Record]:
    """Reads an evaluation set as records.

    Args:
      path: a .json / .jsonl file.
      fmt: "records" (the input format), "sinstruct", "alpaca_eval", or "auto": Self-Instruct when
        the first object has "instances", AlpacaEval when it has "generator", else the input format.
      max_examples: keep the first N (0 = all).
      skipped: None = an empty reference is an error; a list = such examples are left out (before
        `max_examples` is applied) and where they are appended to it.
    Raises:
      EvalError, DataError: unreadable file, unknown format or invalid records (the message names them).
    """
    path = pathlib.Path(path).expanduser()
    if fmt not in EVAL_FORMATS:
        raise EvalError(f"unknown eval format {fmt!r}; choose one of: {', '.join(EVAL_FORMATS)}.")
    objects = data_lib.read_objects(path, "eval.set", error=EvalError)
    if fmt == "auto":
        first = objects[0][1] if objects else {}
        first = first if isinstance(first, dict) else {}
        fmt = "sinstruct" if "instances" in first else "alpaca_eval" if "generator" in first else "records"
    if fmt == "sinstruct":
        objects = sinstruct_objects(objects)
    elif fmt == "alpaca_eval":
        objects = alpaca_eval_objects(objects)
    if skipped is not None:
        return data_lib.records_from_objects(objects, str(path), "eval", skipped=skipped)[: max_examples or None]
    if max_examples:
        objects = objects[:max_examples]
    return data_lib.records_from_objects(objects, str(path), "eval")


# -- metrics -------------------------------------------------------------------------------------


def win_rate(candidate_nll: Sequence[float] | np.ndarray, base_nll: Sequence[float] | np.ndarray) -> float:
    """Mean over examples of [candidate < base] + 1/2 [candidate == base] (lower NLL wins)."""
    a, b = np.asarray(candidate_nll, np.float64), np.asarray(base_nll, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise EvalError(f"win_rate needs two equal non-empty [N] arrays, got {a.shape} and {b.shape}.")
    return float(np.mean((a < b) + 0.5 * (a == b)))


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Per-example response log-likelihoods of one model on one evaluation set."""

    logp: np.ndarray  # [N] float32: sum of response-token log-probs
    n_tokens: np.ndarray  # [N] int32: response tokens scored

    @property
    def nll(self) -> np.ndarray:
        """[N] per-example response NLL (nats, summed over its tokens)."""
        return -self.logp.astype(np.float64)

    @property
    def nll_per_token(self) -> float:
        return float(-self.logp.astype(np.float64).sum() / self.n_tokens.sum())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll_per_token))

    def summary(self, base: EvalResult | None = None) -> dict[str, float]:
        """nll_per_token, perplexity, mean per-example NLL per token; win_rate and deltas against `base`."""
        out = {
            "nll_per_token": self.nll_per_token,
            "perplexity": self.perplexity,
            "mean_example_nll_per_token": float(np.mean(self.nll / self.n_tokens)),
            "examples": int(self.logp.size),
            "response_tokens": int(self.n_tokens.sum()),
        }
        if base is not None:
            out["win_rate_vs_base"] = win_rate(self.nll, base.nll)
            out["delta_nll_per_token"] = self.nll_per_token - base.nll_per_token
        return out

    def by_group(self, labels: Sequence[str]) -> dict[str, float]:
        """NLL per token within each label (e.g. the records' category)."""
        labels = np.asarray(labels)
        return {
            str(g): float(-self.logp[labels == g].astype(np.float64).sum() / self.n_tokens[labels == g].sum())
            for g in sorted(set(labels.tolist()))
        }


# -- the evaluator -------------------------------------------------------------------------------


class Evaluator:
    """Scores one evaluation set with any parameter state of one architecture (compiled once).

    Args:
      model: the base model, in the evaluation dtype.
      tokenizer: its tokenizer.
      records: the evaluation set.
      template: prompt template (the one used for training).
      max_tokens: examples are cut to their first `max_tokens` tokens (response tokens past it not
        scored; an example whose prompt fills them is left out, its id in `left_out`).
      bos: put the tokenizer's leading special tokens in front (as training with bos=True does).
      engine_config: batching of the scoring engine.
      mesh: default all devices.
      log: messages.
    """

    def __init__(
        self,
        model: Llama,
        tokenizer,
        records: Sequence[data_lib.Record],
        template: data_lib.Template,
        max_tokens: int = 512,
        bos: bool = True,
        engine_config: scoring.EngineConfig | None = None,
        mesh: jax.sharding.Mesh | None = None,
        log: Callable[[str], None] = print,
    ):
        policy = data_lib.TokenPolicy(max_task_tokens=max_tokens)
        # Examples whose prompt leaves no response token inside max_tokens are left out (said below).
        left_out: list[str] = []
        self.tasks = data_lib.tokenize_tasks(tokenizer, records, template, policy, "eval", left_out)
        self.left_out = tuple(left_out)
        dropped = set(left_out)
        self.records = [r for r in records if r.id not in dropped]
        if left_out:
            log(
                f"eval: left out {len(left_out)} example(s) with no response token inside max_tokens={max_tokens} "
                f"(ids {', '.join(left_out[:5])}{' ...' if len(left_out) > 5 else ''})"
            )
        self.prefix = np.asarray(data_lib.leading_special_tokens(tokenizer) if bos else [], np.int32)
        self.dtype = model.dtype
        self._engine_args = (model, engine_config, mesh, log)
        self._engine: scoring.Engine | None = None

    @property
    def engine(self) -> scoring.Engine:
        """The scoring engine, compiled on first use: a comparison whose evaluations are all saved
        compiles nothing."""
        if self._engine is None:
            model, engine_config, mesh, log = self._engine_args
            self._engine = scoring.Engine(model, self.tasks, [len(self.prefix)], engine_config, mesh=mesh, log=log)
            self._base_state = self._engine.state
            self._leaves = jax.tree_util.tree_structure(self._base_state)
        return self._engine

    def evaluate(self, params=None) -> EvalResult:
        """Response log-likelihoods under `params` (an nnx state of the base architecture, any float
        dtype; cast to the evaluation dtype), or of the base model when None."""
        engine = self.engine
        if params is None:
            state = self._base_state
        else:
            if jax.tree_util.tree_structure(params) != self._leaves:
                raise EvalError("the parameter state does not match the evaluated model's architecture.")
            cast = jax.tree.map(lambda x: jnp.asarray(x, self.dtype), params)
            state = jax.device_put(cast, engine.state_shardings)  # the programs' layout
        # The engine's programs take the state as an argument: same shapes, no recompilation.
        engine.state = state
        try:
            logp, _, _ = engine.zero_shot(self.prefix)
        finally:
            engine.state = self._base_state
        if not np.all(np.isfinite(logp)):
            bad = [self.records[i].id for i in np.flatnonzero(~np.isfinite(logp))[:5]]
            raise EvalError(f"non-finite response log-likelihood for eval records {bad}; check the model/dtype.")
        return EvalResult(logp.astype(np.float32), self.tasks.n_tokens.astype(np.int32))
