"""Independent PyTorch reference of the chat-template scoring contract; checks a nuggets_jax workdir.

Nothing here comes from `nuggets_jax.data` or `nuggets_jax.scoring`: records are read, turned into
conversations, rendered with the tokenizer's `chat_template`, tokenized segment by segment and scored
with HF transformers on whole sequences (no prefix cache, no packing, every sequence at position 0).

Segments of a conversation m_1..m_n, per assistant message m_k (k' the previous one):
    unscored  render(m_1..m_{k-1}, gen=True) minus render(m_1..m_{k'})   ("" for the first)
    scored    render(m_1..m_k) minus render(m_1..m_{k-1}, gen=True)
then an unscored tail render(m_1..m_n) minus render(m_1..m_last). Each segment is tokenized on its own
without special tokens; `score_turns="last"` scores only the last assistant segment.

Run:
    python -m benchmarks.chat_reference --pool pool.json --tasks tasks.json --workdir W \
        [--model DIR] [--max_task_tokens 512] [--max_prefix_tokens 512] [--score_turns all|last]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SCORE_TURNS = ("all", "last")
LOGP_TOL = 1e-3  # per scored token


# -- records and conversations ----------------------------------------------------------------------


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads records from a .json list, a .jsonl file or (with pyarrow) a .parquet file.

    Args:
        path: the file.

    Returns:
        The records as dicts.

    Raises:
        ValueError: the file is not a list of JSON objects.
    """
    path = pathlib.Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of JSON objects")
    return records


def record_id(obj: Mapping[str, Any], position: int) -> str:
    """The record's `id` field as a string, else its 0-based position."""
    value = obj.get("id")
    return str(position if value is None else value)


def _content(content: Any, where: str) -> str:
    """A message content: a string, or a list of parts whose text parts are joined with ""."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text", part.get("value"))
                if not isinstance(text, str):
                    raise ValueError(f"{where}: a text part without a string 'text'/'value'")
                texts.append(text)
        return "".join(texts)
    raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")


def conversation(obj: Mapping[str, Any]) -> list[dict[str, str]]:
    """The conversation of a record as [{role, content}] (messages, ShareGPT or Alpaca form).

    Args:
        obj: a record with `messages`, `conversations` or `instruction`/`output`.

    Returns:
        The messages with roles system/user/assistant. messages/ShareGPT contents are kept as given;
        Alpaca fields (system, history, instruction, input, output) are stripped.

    Raises:
        ValueError: an unknown form, role or content type.
    """
    if obj.get("messages") is not None:
        out = []
        for i, message in enumerate(obj["messages"]):
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"messages[{i}]: unknown role {role!r}")
            out.append({"role": role, "content": _content(message.get("content"), f"messages[{i}]")})
        return out
    if obj.get("conversations") is not None:
        out = []
        for i, message in enumerate(obj["conversations"]):
            role = SHAREGPT_ROLES.get(message.get("from"))
            if role is None:
                raise ValueError(f"conversations[{i}]: unknown 'from' {message.get('from')!r}")
            out.append({"role": role, "content": _content(message.get("value"), f"conversations[{i}]")})
        return out
    if "instruction" in obj and "output" in obj:
        out = []
        system = (obj.get("system") or "").strip()
        if system:
            out.append({"role": "system", "content": system})
        for pair in obj.get("history") or []:
            user, assistant = pair
            out += [{"role": "user", "content": user.strip()}, {"role": "assistant", "content": assistant.strip()}]
        prompt = obj["instruction"].strip()
        extra = (obj.get("input") or "").strip()
        if extra:
            prompt += "\n\n" + extra
        out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"].strip()}]
        return out
    raise ValueError(f"a record needs 'messages', 'conversations' or 'instruction'+'output'; keys: {sorted(obj)}")


# -- rendering and tokens ---------------------------------------------------------------------------


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _after(longer: str, shorter: str, what: str) -> str:
    """`longer` without its prefix `shorter`; the template must render conversations as growing prefixes."""
    if not longer.startswith(shorter):
        raise ValueError(f"the chat template is not prefix-stable: {what} does not start with the previous render")
    return longer[len(shorter) :]


def segments(tokenizer: Any, messages: Sequence[Mapping[str, str]], score_turns: str = "all") -> list[tuple[str, bool]]:
    """Splits the rendered conversation into (text, scored) segments, in order; empty texts are dropped.

    Args:
        tokenizer: a HF tokenizer with a `chat_template`.
        messages: [{role, content}], at least one assistant message.
        score_turns: "all" (every assistant message) or "last" (only the last one).

    Returns:
        The segments; their texts concatenate to render(messages).

    Raises:
        ValueError: no assistant message, one first, an unknown score_turns, or a template whose renders
            are not prefixes of each other.
    """
    if score_turns not in SCORE_TURNS:
        raise ValueError(f"score_turns must be one of {SCORE_TURNS}, got {score_turns!r}")
    assistants = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
    if not assistants:
        raise ValueError("the conversation has no assistant message to score")
    if assistants[0] == 0:
        raise ValueError("the conversation starts with an assistant message: nothing to render before it")
    out: list[tuple[str, bool]] = []
    previous = ""
    for k in assistants:
        context = _render(tokenizer, messages[:k], True)
        full = _render(tokenizer, messages[: k + 1], False)
        out.append((_after(context, previous, f"render(m_1..m_{k}, gen=True)"), False))
        scored = score_turns == "all" or k == assistants[-1]
        out.append((_after(full, context, f"render(m_1..m_{k + 1})"), scored))
        previous = full
    out.append((_after(_render(tokenizer, messages, False), previous, "render(all)"), False))
    return [(text, scored) for text, scored in out if text]


def tokens(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], score_turns: str = "all"
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation (each segment tokenized on its own, no special tokens) and their scored flags.

    Args:
        tokenizer: a HF tokenizer with a `chat_template`.
        messages: [{role, content}].
        score_turns: "all" or "last".

    Returns:
        (ids, scored), of equal length.
    """
    ids: list[int] = []
    scored: list[bool] = []
    for text, is_scored in segments(tokenizer, messages, score_turns):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        scored += [is_scored] * len(piece)
    return ids, scored


# -- scoring ----------------------------------------------------------------------------------------


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Groups sequence indices, longest first, so that rows x longest length <= batch_tokens (>= 1 row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _score_sequences(
    model: Any, sequences: Sequence[tuple[list[int], list[bool]]], batch_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log p(token | earlier tokens) and argmax hits over the scored tokens of each sequence.

    Each sequence runs whole from position 0, right-padded within its batch. The LM head is applied
    only at the positions that predict a scored token (row p-1 predicts token p).
    """
    import torch

    device = next(model.parameters()).device
    logp = np.zeros(len(sequences), np.float64)
    correct = np.zeros(len(sequences), np.int64)
    lengths = [len(ids) for ids, _ in sequences]
    for group in _batches(lengths, batch_tokens):
        width = lengths[group[0]]
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : lengths[i]] = torch.tensor(sequences[i][0], dtype=torch.long)
            mask[row, : lengths[i]] = 1
        positions = torch.arange(width).unsqueeze(0).expand(len(group), -1)
        with torch.no_grad():
            hidden = model.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
            ).last_hidden_state  # [B, L, D]
            for row, i in enumerate(group):
                targets = [p for p, flag in enumerate(sequences[i][1]) if flag and p > 0]
                if not targets:
                    continue
                index = torch.tensor(targets, device=device)
                logits = model.lm_head(hidden[row, index - 1]).float()  # [S, V]
                logprobs = torch.log_softmax(logits, dim=-1)
                target_ids = ids[row, index.cpu()].to(device)
                logp[i] = float(logprobs.gather(-1, target_ids[:, None]).sum(dtype=torch.float64))
                correct[i] = int((logprobs.argmax(-1) == target_ids).sum())
    return logp, correct


def reference_scores(
    model: Any,
    tokenizer: Any,
    pool_objs: Sequence[Mapping[str, Any]],
    task_objs: Sequence[Mapping[str, Any]],
    max_task_tokens: int = 512,
    max_prefix_tokens: int = 512,
    score_turns: str = "all",
    batch_tokens: int = 8192,
) -> dict[str, Any]:
    """Zero-shot and one-shot scores of every (candidate, task) pair under the chat contract.

    Args:
        model: a HF causal LM with `.model` (the decoder) and `.lm_head`, e.g. LlamaForCausalLM.
        tokenizer: its tokenizer, with a `chat_template`.
        pool_objs: candidate records (any accepted form).
        task_objs: task records.
        max_task_tokens: task sequences are cut to their first this many tokens.
        max_prefix_tokens: candidate prefixes are cut to their first this many tokens.
        score_turns: "all" or "last" (applies to tasks; prefixes are never scored).
        batch_tokens: padded tokens per forward pass.

    Returns:
        dict with `zero_logp` [T] f32, `zero_correct` [T] i32, `n_tokens` [T] i32, `one_logp` [C, T] f32,
        `one_correct` [C, T] i32, `win_rate` [C] f64, `candidate_ids`, `task_ids` (lists of str).

    Raises:
        ValueError: naming the task that has no scored token left after the cut.
    """
    tasks = []
    for t, obj in enumerate(task_objs):
        ids, scored = tokens(tokenizer, conversation(obj), score_turns)
        ids, scored = ids[:max_task_tokens], scored[:max_task_tokens]
        if not any(scored):
            raise ValueError(f"task {record_id(obj, t)!r}: no scored token within the first {max_task_tokens} tokens")
        if scored[0]:
            raise ValueError(f"task {record_id(obj, t)!r}: its first token is scored, which zero-shot cannot predict")
        tasks.append((ids, scored))
    prefixes = [tokens(tokenizer, conversation(obj), "all")[0][:max_prefix_tokens] for obj in pool_objs]
    sequences = list(tasks)
    for prefix in prefixes:
        sequences += [(prefix + ids, [False] * len(prefix) + scored) for ids, scored in tasks]
    logp, correct = _score_sequences(model, sequences, batch_tokens)
    num_tasks = len(tasks)
    zero_logp = logp[:num_tasks].astype(np.float32)
    one_logp = logp[num_tasks:].reshape(len(prefixes), num_tasks).astype(np.float32)
    return {
        "zero_logp": zero_logp,
        "zero_correct": correct[:num_tasks].astype(np.int32),
        "n_tokens": np.array([sum(scored) for _, scored in tasks], np.int32),
        "one_logp": one_logp,
        "one_correct": correct[num_tasks:].reshape(len(prefixes), num_tasks).astype(np.int32),
        "win_rate": win_rate(one_logp, zero_logp),
        "candidate_ids": [record_id(obj, c) for c, obj in enumerate(pool_objs)],
        "task_ids": [record_id(obj, t) for t, obj in enumerate(task_objs)],
    }


def win_rate(one_logp: np.ndarray, zero_logp: np.ndarray) -> np.ndarray:
    """Per candidate, the fraction of tasks with one_logp > zero_logp (strict), float64."""
    return np.mean(np.asarray(one_logp) > np.asarray(zero_logp)[None, :], axis=1)


# -- comparison -------------------------------------------------------------------------------------


def compare(ref: Mapping[str, Any], scores: Mapping[str, Any], tol: float = LOGP_TOL) -> dict[str, Any]:
    """Checks a nuggets_jax score store against the reference.

    Args:
        ref: `reference_scores` output.
        scores: the arrays of `scores.npz` (zero_logp, zero_correct, n_tokens, one_logp, one_correct,
            candidate_ids, task_ids).
        tol: largest allowed |logp_ref - logp_nj| / n_tokens.

    Returns:
        dict with `ok` and per check: `candidate_ids_match`, `task_ids_match`, `n_tokens_match`,
        `max_err` (per token, over zero- and one-shot), `worst` (where), `logp_ok`, `win_rate_ref`,
        `win_rate_nj`, `win_rate_diffs` (list of {candidate, ref, nj, flips, ties}), `win_rate_ok`,
        `all_diffs_are_ties`, `correct_mismatches` (argmax hit counts that differ; informational).
        A difference is a tie when every flipped pair has |one_ref - zero_ref| / n_tokens <= 2 * tol.
    """
    cand_nj = [str(x) for x in np.asarray(scores["candidate_ids"]).tolist()]
    task_nj = [str(x) for x in np.asarray(scores["task_ids"]).tolist()]
    report: dict[str, Any] = {
        "candidate_ids_match": cand_nj == list(ref["candidate_ids"]),
        "task_ids_match": task_nj == list(ref["task_ids"]),
        "num_candidates": (len(ref["candidate_ids"]), len(cand_nj)),
        "num_tasks": (len(ref["task_ids"]), len(task_nj)),
    }
    if not (report["candidate_ids_match"] and report["task_ids_match"]):
        report.update(ok=False, n_tokens_match=False, logp_ok=False, win_rate_ok=False)
        return report
    n_ref, n_nj = np.asarray(ref["n_tokens"]), np.asarray(scores["n_tokens"])
    report["n_tokens_match"] = bool(np.array_equal(n_ref, n_nj))
    report["n_tokens_diff"] = [(ref["task_ids"][t], int(n_ref[t]), int(n_nj[t])) for t in np.flatnonzero(n_ref != n_nj)]
    n = np.maximum(n_ref, 1).astype(np.float64)
    zero_ref = np.asarray(ref["zero_logp"], np.float64)
    one_ref = np.asarray(ref["one_logp"], np.float64)
    zero_nj = np.asarray(scores["zero_logp"], np.float64)
    one_nj = np.asarray(scores["one_logp"], np.float64)
    zero_err = np.abs(zero_ref - zero_nj) / n
    one_err = np.abs(one_ref - one_nj) / n[None]
    worst_zero = int(np.argmax(zero_err)) if zero_err.size else 0
    max_zero = float(zero_err.max()) if zero_err.size else 0.0
    max_one = float(one_err.max()) if one_err.size else 0.0
    if one_err.size and max_one >= max_zero:
        c, t = np.unravel_index(int(np.argmax(one_err)), one_err.shape)
        worst = f"one-shot candidate {ref['candidate_ids'][c]!r} task {ref['task_ids'][t]!r}"
    else:
        worst = f"zero-shot task {ref['task_ids'][worst_zero]!r}" if zero_err.size else "-"
    report["max_err"] = max(max_zero, max_one)
    report["max_err_zero"], report["max_err_one"] = max_zero, max_one
    report["worst"] = worst
    report["logp_ok"] = bool(np.isfinite(report["max_err"]) and report["max_err"] <= tol)

    wins_ref = one_ref > zero_ref[None]
    wins_nj = one_nj > zero_nj[None]
    margin = np.abs(one_ref - zero_ref[None]) / n[None]
    report["win_rate_ref"] = wins_ref.mean(axis=1)
    report["win_rate_nj"] = wins_nj.mean(axis=1)
    diffs = []
    for c in range(wins_ref.shape[0]):
        flips = np.flatnonzero(wins_ref[c] != wins_nj[c])
        if flips.size:
            diffs.append(
                {
                    "candidate": ref["candidate_ids"][c],
                    "ref": float(report["win_rate_ref"][c]),
                    "nj": float(report["win_rate_nj"][c]),
                    "flips": [ref["task_ids"][t] for t in flips],
                    "ties": bool(np.all(margin[c, flips] <= 2 * tol)),
                }
            )
    report["win_rate_diffs"] = diffs
    report["win_rate_ok"] = not any(
        report["win_rate_ref"][i] != report["win_rate_nj"][i] for i in range(len(report["win_rate_ref"]))
    )
    report["all_diffs_are_ties"] = all(d["ties"] for d in diffs)
    report["correct_mismatches"] = int(
        np.sum(np.asarray(ref["zero_correct"]) != np.asarray(scores["zero_correct"]))
        + np.sum(np.asarray(ref["one_correct"]) != np.asarray(scores["one_correct"]))
    )
    report["ok"] = report["n_tokens_match"] and report["logp_ok"] and report["win_rate_ok"]
    return report


def format_report(report: Mapping[str, Any], tol: float = LOGP_TOL) -> str:
    """A short human-readable table of a `compare` report."""

    def mark(flag: bool) -> str:
        return "ok" if flag else "FAIL"

    lines = [
        f"{'candidate ids':<24}{mark(report['candidate_ids_match'])}  (ref, nj) = {report['num_candidates']}",
        f"{'task ids':<24}{mark(report['task_ids_match'])}  (ref, nj) = {report['num_tasks']}",
    ]
    if not (report["candidate_ids_match"] and report["task_ids_match"]):
        return "\n".join(lines + ["ids differ: nothing else compared"])
    lines.append(
        f"{'n_tokens':<24}{mark(report['n_tokens_match'])}  differing (id, ref, nj): {report['n_tokens_diff']}"
    )
    lines.append(
        f"{'max |dlogp| / n_tokens':<24}{mark(report['logp_ok'])}  {report['max_err']:.3g} (tol {tol:g}; "
        f"zero {report['max_err_zero']:.3g}, one {report['max_err_one']:.3g}; worst {report['worst']})"
    )
    diffs = report["win_rate_diffs"]
    ties = sum(d["ties"] for d in diffs)
    lines.append(
        f"{'win rates':<24}{mark(report['win_rate_ok'])}  {len(diffs)} of {len(report['win_rate_ref'])} "
        f"candidates differ ({ties} only by ties within tolerance)"
    )
    for d in diffs:
        lines.append(f"    {d['candidate']!r}: ref {d['ref']:.4f} nj {d['nj']:.4f} flips {d['flips']} ties={d['ties']}")
    lines.append(f"{'argmax hits differing':<24}{report['correct_mismatches']} (informational)")
    lines.append(f"{'overall':<24}{mark(report['ok'])}")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------


def load_model(directory: str | os.PathLike, device: str = "cpu") -> tuple[Any, Any]:
    """A HF causal LM in float32 (eval mode) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="candidate records: .json, .jsonl or .parquet")
    parser.add_argument("--tasks", required=True, help="task records: .json, .jsonl or .parquet")
    parser.add_argument("--workdir", required=True, help="nuggets_jax scoring workdir holding scores.npz")
    parser.add_argument("--model", default=None, help="HF dir (default: the nuggets_jax default model)")
    parser.add_argument("--max_task_tokens", type=int, default=512)
    parser.add_argument("--max_prefix_tokens", type=int, default=512)
    parser.add_argument("--score_turns", choices=SCORE_TURNS, default="all")
    parser.add_argument("--max_candidates", type=int, default=0, help="only the first N candidates (0 = all)")
    parser.add_argument("--max_tasks", type=int, default=0, help="only the first N tasks (0 = all)")
    parser.add_argument("--batch_tokens", type=int, default=8192, help="padded tokens per forward pass")
    parser.add_argument("--tol", type=float, default=LOGP_TOL, help="largest |dlogp| / n_tokens")
    parser.add_argument("--allow_ties", action="store_true", help="pass when every win-rate difference is a tie")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Computes the reference, compares it with WORKDIR/scores.npz, prints a table; returns the exit status."""
    args = _parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    directory = args.model
    if directory is None:
        from nuggets_jax.models import ensure_default_model

        directory = ensure_default_model()
    pool = load_records(args.pool)
    tasks = load_records(args.tasks)
    if args.max_candidates:
        pool = pool[: args.max_candidates]
    if args.max_tasks:
        tasks = tasks[: args.max_tasks]
    model, tokenizer = load_model(directory, args.device)
    ref = reference_scores(
        model,
        tokenizer,
        pool,
        tasks,
        max_task_tokens=args.max_task_tokens,
        max_prefix_tokens=args.max_prefix_tokens,
        score_turns=args.score_turns,
        batch_tokens=args.batch_tokens,
    )
    with np.load(pathlib.Path(args.workdir) / "scores.npz") as npz:
        scores = {key: npz[key] for key in npz.files}
    report = compare(ref, scores, args.tol)
    print(f"{len(pool)} candidates x {len(tasks)} tasks, model {directory}, score_turns={args.score_turns}")
    print(format_report(report, args.tol))
    ok = report["ok"] or (
        args.allow_ties and report["n_tokens_match"] and report["logp_ok"] and report.get("all_diffs_are_ties", False)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
