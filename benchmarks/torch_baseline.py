"""The original Nuggets scoring loop in PyTorch + HF transformers: speed baseline and independent reference.

This re-implements, independently of `nuggets_jax`, what pldlgb/nuggets `instruction_main.py` does for the
`original` preset (see docs/ARCHITECTURE.md, "Token spans"):

- every task is run zero-shot once, in batches right-padded to `max_task_tokens`, with a full-vocabulary
  log_softmax over all positions;
- for each candidate the prefix K/V is computed once, then expanded over each batch of `task_batch` tasks
  (materialised by the cache's concatenation, as the original does), the tasks right-padded to
  `max_task_tokens`, positions continuing after the prefix, again a full-vocabulary log_softmax.

Run:
    python -m benchmarks.torch_baseline --model_dir DIR --pool pool.json --tasks tasks.json \
        --num_candidates 8 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

# Measured on the 2-core AVX-512 CPU, SmolLM2-135M shape, one batch of 16 tasks x 200 tokens after an
# 80-token prefix, eager and sdpa interleaved: sdpa 10-25% faster (min 17.9 s vs 20.3 s on a busy machine;
# 5.9 s vs 7.8 s for one candidate x 16 of the paper's tasks). Attention is a small part of the FLOPs here.
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _prompt_text(record: dict[str, Any]) -> str:
    input_text = record.get("input") or ""
    prompt = f"Instruction:\n{record['instruction'].strip()}\n"
    if input_text.strip():
        prompt += f"Input:\n{input_text.strip()}\n"
    return prompt + "Response:\n"


def _full_text(record: dict[str, Any]) -> str:
    return _prompt_text(record) + record["output"].strip()


def tokenize_original(tokenizer: Any, record: dict[str, Any], max_task_tokens: int = 200) -> tuple[list[int], int]:
    """Token ids of a task as the `original` preset scores it.

    Prompt and response are tokenized separately without special tokens and concatenated, so the
    response span is exact; the sequence is then cut to its first `max_task_tokens` tokens.

    Args:
        tokenizer: a HF tokenizer.
        record: dict with `instruction`, `output` and optional `input` (missing or None means "").
        max_task_tokens: the cut; response tokens beyond it are not scored.

    Returns:
        (task_ids, response_start): the cut ids and the index of the first response token in them.

    Raises:
        ValueError: if no response token is left to score (empty output, or the prompt fills the cut).
    """
    prompt_ids = tokenizer(_prompt_text(record), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(record["output"].strip(), add_special_tokens=False)["input_ids"]
    if not response_ids:
        raise ValueError("the output is empty, so there is no response token to score; drop this record")
    task_ids = (prompt_ids + response_ids)[:max_task_tokens]
    response_start = len(prompt_ids)
    if response_start >= len(task_ids):
        raise ValueError(
            f"the prompt takes {len(prompt_ids)} tokens, so the cut at {max_task_tokens} tokens leaves no "
            "response token to score; shorten the instruction/input or raise max_task_tokens"
        )
    return task_ids, response_start


def prefix_ids_original(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    """Token ids of a candidate's full text (prompt + output) with the tokenizer's default special tokens.

    Args:
        tokenizer: a HF tokenizer (e.g. Llama adds BOS here, SmolLM2 adds nothing).
        record: dict with `instruction`, `output` and optional `input`.

    Returns:
        The prefix ids; the one-shot sequence is these followed directly by the task ids.
    """
    return tokenizer(_full_text(record))["input_ids"]


def _pad_tasks(tokenized: Sequence[tuple[list[int], int]], length: int) -> tuple[torch.Tensor, ...]:
    """Right-pads task ids to `length`; returns ids, mask and the score mask over next-token targets."""
    count = len(tokenized)
    ids = torch.zeros((count, length), dtype=torch.long)  # [T, L]
    mask = torch.zeros((count, length), dtype=torch.long)  # [T, L]
    # score[t, j] says whether target ids[t, j + 1] (predicted at position j) is a scored response token.
    score = torch.zeros((count, length - 1), dtype=torch.bool)  # [T, L-1]
    for t, (task_ids, start) in enumerate(tokenized):
        ids[t, : len(task_ids)] = torch.tensor(task_ids, dtype=torch.long)
        mask[t, : len(task_ids)] = 1
        score[t, start - 1 : len(task_ids) - 1] = True
    return ids, mask, score


def _score_logits(logits: torch.Tensor, ids: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of response log-probs and argmax hits per row, from logits over every task position."""
    # Full-vocabulary log_softmax over all positions, as the original does; float32 whatever the model dtype.
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, L-1, V]
    targets = ids[:, 1:]  # [B, L-1]
    token_logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    hits = logprobs.argmax(dim=-1) == targets  # [B, L-1]
    logp = torch.where(score, token_logp, torch.zeros_like(token_logp)).sum(dim=-1)  # [B]
    correct = (hits & score).sum(dim=-1)  # [B]
    return logp.cpu(), correct.cpu()


def score_original(
    model: Any,
    tokenizer: Any,
    candidates: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
    task_batch: int = 16,
    max_task_tokens: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    """Scores every (candidate, task) pair the way the original repository does.

    Tokenizes the records (`tokenize_original`, `prefix_ids_original`) and runs `score_original_ids`.

    Args:
        model: a HF causal LM (its device and dtype are used as they are).
        tokenizer: the model's tokenizer.
        candidates: records used as one-shot prefixes.
        tasks: task records.
        task_batch: tasks per forward pass.
        max_task_tokens: task sequences are cut to (and padded to) this many tokens.
        progress: show a tqdm bar over candidates.

    Returns:
        What `score_original_ids` returns.

    Raises:
        ValueError: naming the task index when a task has no response token to score.
    """
    tokenized = []
    for index, record in enumerate(tasks):
        try:
            tokenized.append(tokenize_original(tokenizer, record, max_task_tokens))
        except ValueError as error:
            raise ValueError(f"task {index}: {error}") from error
    return score_original_ids(
        model,
        [ids for ids, _ in tokenized],
        [start for _, start in tokenized],
        [prefix_ids_original(tokenizer, record) for record in candidates],
        task_batch=task_batch,
        max_task_tokens=max_task_tokens,
        progress=progress,
    )


@torch.no_grad()
def score_original_ids(
    model: Any,
    task_ids: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    prefix_ids: Sequence[Sequence[int]],
    task_batch: int = 16,
    max_task_tokens: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    """The original scoring loop on token ids (tasks already cut, prefixes as they are).

    Args:
        model: a HF causal LM (its device and dtype are used as they are).
        task_ids: per task its ids, prompt ++ response, at most `max_task_tokens` of them.
        response_starts: per task the index of its first scored (response) token.
        prefix_ids: per candidate its prefix ids; the one-shot sequence is these followed by the task.
        task_batch: tasks per forward pass.
        max_task_tokens: every task is right-padded to this many tokens.
        progress: show a tqdm bar over candidates.

    Returns:
        dict with numpy arrays `zero_logp` [T] f32, `zero_correct` [T] i32, `n_tokens` [T] i32,
        `one_logp` [C, T] f32, `one_correct` [C, T] i32, and `timings`: `zero_s`, `one_s` (seconds of the
        zero-shot and one-shot passes), `pairs_per_s` and `task_tokens_per_s` (real, unpadded task tokens
        of the one-shot pass per second).

    Raises:
        ValueError: naming the task index when a task is longer than `max_task_tokens` or has no
            response token to score.
    """
    device = next(model.parameters()).device
    tokenized = []
    for index, (ids, start) in enumerate(zip(task_ids, response_starts, strict=True)):
        ids, start = [int(i) for i in ids], int(start)
        if len(ids) > max_task_tokens:
            raise ValueError(f"task {index}: {len(ids)} tokens, more than max_task_tokens={max_task_tokens}; cut it")
        if not 0 < start < len(ids):
            raise ValueError(f"task {index}: response start {start} leaves no response token in {len(ids)} tokens")
        tokenized.append((ids, start))
    n_tokens = np.array([len(ids) - start for ids, start in tokenized], dtype=np.int32)  # [T]
    real_task_tokens = sum(len(ids) for ids, _ in tokenized)
    ids, mask, score = _pad_tasks(tokenized, max_task_tokens)
    ids, mask, score = ids.to(device), mask.to(device), score.to(device)
    num_tasks = len(tokenized)
    batches = [slice(b, min(b + task_batch, num_tasks)) for b in range(0, num_tasks, task_batch)]

    start_time = time.perf_counter()
    zero_logp = np.zeros(num_tasks, np.float32)
    zero_correct = np.zeros(num_tasks, np.int32)
    for batch in batches:
        logits = model(input_ids=ids[batch], attention_mask=mask[batch]).logits  # [B, L, V]
        logp, correct = _score_logits(logits, ids[batch], score[batch])
        zero_logp[batch], zero_correct[batch] = logp.numpy(), correct.numpy()
    zero_s = time.perf_counter() - start_time

    start_time = time.perf_counter()
    one_logp = np.zeros((len(prefix_ids), num_tasks), np.float32)
    one_correct = np.zeros((len(prefix_ids), num_tasks), np.int32)
    candidate_iter = enumerate(prefix_ids)
    if progress:
        from tqdm import tqdm

        candidate_iter = tqdm(candidate_iter, total=len(prefix_ids), desc="one-shot", file=sys.stderr)
    for c, candidate_ids in candidate_iter:
        prefix = torch.tensor([list(candidate_ids)], dtype=torch.long, device=device)
        prefix_len = prefix.shape[1]
        # Only the K/V of the prefix is needed, so skip its LM head except for one position.
        prefix_cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache
        prefix_kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]  # each [1, H_kv, P, D]
        positions = torch.arange(prefix_len, prefix_len + max_task_tokens, device=device)  # [L]
        for batch in batches:
            rows = batch.stop - batch.start
            cache = DynamicCache()
            for layer_index, (keys, values) in enumerate(prefix_kv):
                cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer_index)
            prefix_mask = torch.ones((rows, prefix_len), dtype=mask.dtype, device=device)
            logits = model(
                input_ids=ids[batch],
                attention_mask=torch.cat([prefix_mask, mask[batch]], dim=1),  # [B, P + L]
                position_ids=positions.unsqueeze(0).expand(rows, -1),  # [B, L]
                cache=cache,
                use_cache=True,
            ).logits  # [B, L, V]
            logp, correct = _score_logits(logits, ids[batch], score[batch])
            one_logp[c, batch], one_correct[c, batch] = logp.numpy(), correct.numpy()
    one_s = time.perf_counter() - start_time

    pairs = len(prefix_ids) * num_tasks
    return {
        "zero_logp": zero_logp,
        "zero_correct": zero_correct,
        "n_tokens": n_tokens,
        "one_logp": one_logp,
        "one_correct": one_correct,
        "timings": {
            "zero_s": zero_s,
            "one_s": one_s,
            "pairs_per_s": pairs / one_s if one_s > 0 else float("nan"),
            "task_tokens_per_s": len(prefix_ids) * real_task_tokens / one_s if one_s > 0 else float("nan"),
        },
    }


def win_rate(one_logp: np.ndarray, zero_logp: np.ndarray) -> np.ndarray:
    """The paper's golden score: per candidate, the fraction of tasks with one_logp > zero_logp (strict).

    Args:
        one_logp: [C, T] one-shot sums of response log-probs.
        zero_logp: [T] zero-shot sums.

    Returns:
        [C] float64 win rates.
    """
    return np.mean(one_logp > zero_logp[None, :], axis=1)


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads records from a .json list or a .jsonl file and checks their fields.

    Args:
        path: the file.

    Returns:
        The records as dicts (other fields kept); a missing or null `input` becomes "".

    Raises:
        ValueError: naming the file and the record (line for .jsonl, index for .json) that is malformed.
    """
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        entries = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{line_number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); use a JSON list or a .jsonl file") from error
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        entries = [(f"{path}[{index}]", record) for index, record in enumerate(data)]
    records = []
    for where, record in entries:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        for field in ("instruction", "output"):
            if not isinstance(record.get(field), str):
                raise ValueError(f'{where}: field "{field}" is missing or not a string; every record needs it')
        if record.get("input") is None:
            record = {**record, "input": ""}
        elif not isinstance(record["input"], str):
            raise ValueError(f'{where}: field "input" must be a string (or absent)')
        records.append(record)
    return records


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="HF-format dir: config.json, safetensors, tokenizer")
    parser.add_argument("--pool", required=True, help="candidate records, .json list or .jsonl")
    parser.add_argument("--tasks", required=True, help="task records, .json list or .jsonl")
    parser.add_argument("--num_candidates", type=int, default=8)
    parser.add_argument("--offset", type=int, default=0, help="index of the first candidate in the pool")
    parser.add_argument("--num_tasks", type=int, default=None, help="score only the first N tasks (default all)")
    parser.add_argument("--task_batch", type=int, default=16)
    parser.add_argument("--max_task_tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default os.cpu_count())")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--attn_implementation", choices=["eager", "sdpa"], default=DEFAULT_ATTN_IMPLEMENTATION)
    parser.add_argument("--out", default=None, help="write the arrays and timings here as JSON")
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns what it writes to --out."""
    args = _parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    pool = load_records(args.pool)
    tasks = load_records(args.tasks)
    if args.num_tasks is not None:
        tasks = tasks[: args.num_tasks]
    if not 0 <= args.offset < len(pool):
        raise ValueError(f"{args.pool}: --offset {args.offset} is outside the pool of {len(pool)} records")
    candidate_indices = list(range(args.offset, min(args.offset + args.num_candidates, len(pool))))
    candidates = [pool[i] for i in candidate_indices]

    load_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=_DTYPES[args.dtype], attn_implementation=args.attn_implementation
    )
    model.to(args.device).eval()
    load_s = time.perf_counter() - load_start

    wall_start = time.perf_counter()
    try:
        result = score_original(
            model,
            tokenizer,
            candidates,
            tasks,
            task_batch=args.task_batch,
            max_task_tokens=args.max_task_tokens,
            progress=not args.no_progress,
        )
    except ValueError as error:
        raise ValueError(f"{args.tasks}: {error}") from error
    wall_s = time.perf_counter() - wall_start
    timings = {**result["timings"], "wall_s": wall_s, "load_s": load_s}

    output: dict[str, Any] = {
        "config": {
            "model_dir": str(args.model_dir),
            "pool": str(args.pool),
            "tasks": str(args.tasks),
            "candidate_indices": candidate_indices,
            "num_tasks": len(tasks),
            "task_batch": args.task_batch,
            "max_task_tokens": args.max_task_tokens,
            "threads": threads,
            "dtype": args.dtype,
            "device": args.device,
            "attn_implementation": args.attn_implementation,
            "torch": torch.__version__,
        },
        **{key: value.tolist() for key, value in result.items() if key != "timings"},
        "win_rate": win_rate(result["one_logp"], result["zero_logp"]).tolist(),
        "timings": timings,
    }
    pairs = len(candidates) * len(tasks)
    print(f"{'candidates x tasks':<22}{len(candidates)} x {len(tasks)} = {pairs} pairs")
    print(f"{'zero-shot pass':<22}{timings['zero_s']:.2f} s")
    print(f"{'one-shot pass':<22}{timings['one_s']:.2f} s")
    print(f"{'pairs/s':<22}{timings['pairs_per_s']:.3f}")
    print(f"{'task tokens/s':<22}{timings['task_tokens_per_s']:.1f}")
    print(f"{'wall (scoring)':<22}{wall_s:.2f} s  (model load {load_s:.2f} s, {threads} threads, {args.dtype})")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(output, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return output


if __name__ == "__main__":
    main()
