"""The projection of the paper's full job: `python -m benchmarks.projection [--model default] [--out FILE]`.

    FLOPs = pool x tasks x (task tokens through the body + response tokens through the LM head
            + attention over prefix and task keys) + pool x (prefix tokens through the body),
    time  = FLOPs / (peak FLOP/s x assumed model FLOP utilisation).

The mean token counts come from the given pool and tasks under the `original` preset, counted
with the given model's tokenizer; the FLOPs are LLaMA-7B's (the paper's model).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.common import (
    DEFAULT_POOL,
    DEFAULT_TASKS,
    machine_info,
    original_pair_flops,
    print_table,
    write_json,
)

# LLaMA-7B (the paper's model), as its HF config.json states it.
LLAMA_7B_HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}
# Dense bfloat16 peaks from the vendors' data sheets (FLOP/s, no sparsity).
H100_SXM_BF16 = 989e12
TPU_V5E_CHIP_BF16 = 197e12
A800_BF16 = 312e12
PAPER_POOL = 52002  # Alpaca-GPT4
PAPER_TASKS = 100
ORIGINAL_A800_DAYS = 10.0  # the original repository's issue #11


def llama_7b_config() -> Any:
    """`ModelConfig` of LLaMA-7B (6.7e9 parameters)."""
    from nuggets_jax.models.config import ModelConfig

    return ModelConfig.from_hf(LLAMA_7B_HF_CONFIG, source="LLaMA-7B config.json")


def full_job_flops(
    config: Any,
    prefix_tokens: float,
    task_tokens: float,
    response_tokens: float,
    pool: int = PAPER_POOL,
    tasks: int = PAPER_TASKS,
) -> dict[str, float]:
    """Useful and original-algorithm FLOPs of scoring `pool` candidates against `tasks` tasks.

    Args:
      config: the model (`ModelConfig`).
      prefix_tokens: mean candidate prefix tokens.
      task_tokens: mean task tokens after the cut.
      response_tokens: mean scored response tokens per task.
      pool: candidates.
      tasks: tasks.

    Returns:
      dict with `useful` (what nuggets_jax computes when it wastes nothing), `original` (what the
      original loop executes) and `per_pair_useful`.
    """
    per_pair = config.task_flops(prefix_tokens, [task_tokens], [response_tokens])
    zero_shot = tasks * config.task_flops(0.0, [task_tokens], [response_tokens])
    prefix = config.prefix_flops(prefix_tokens)
    useful = pool * (tasks * per_pair + prefix) + zero_shot
    original = pool * tasks * original_pair_flops(config, prefix_tokens) + pool * prefix
    return {"useful": useful, "original": original, "per_pair_useful": per_pair}


def project_time(flops: float, peak_flops_per_s: float, mfu: float) -> float:
    """Seconds to do `flops` at `mfu` (model FLOP utilisation, a fraction) of `peak_flops_per_s`."""
    if not 0 < mfu <= 1:
        raise ValueError(f"the assumed MFU must be in (0, 1], got {mfu}")
    return flops / (peak_flops_per_s * mfu)


def projection(
    prefix_tokens: float, task_tokens: float, response_tokens: float, mfus: Sequence[float] = (0.3, 0.5)
) -> dict[str, Any]:
    """The paper's full job (52,002 x 100, LLaMA-7B) on one H100 and on a TPU v5e-256 pod.

    Also states the model FLOP utilisation the original run implies (10 days on one A800).
    """
    config = llama_7b_config()
    flops = full_job_flops(config, prefix_tokens, task_tokens, response_tokens)
    machines = {
        "1x H100 SXM (bf16 dense 989 TFLOP/s)": H100_SXM_BF16,
        "TPU v5e-256 (256 x 197 TFLOP/s)": 256 * TPU_V5E_CHIP_BF16,
    }
    rows = []
    for name, peak in machines.items():
        for mfu in mfus:
            seconds = project_time(flops["useful"], peak, mfu)
            rows.append({"machine": name, "peak_flops_per_s": peak, "assumed_mfu": mfu, "hours": seconds / 3600})
    original_s = ORIGINAL_A800_DAYS * 86400
    return {
        "model": "LLaMA-7B",
        "parameters": 6.7e9,
        "pool": PAPER_POOL,
        "tasks": PAPER_TASKS,
        "mean_prefix_tokens": prefix_tokens,
        "mean_task_tokens": task_tokens,
        "mean_response_tokens": response_tokens,
        "body_flops_per_token": config.flops_per_token(lm_head=False),
        "lm_head_flops_per_token": config.flops_per_token() - config.flops_per_token(lm_head=False),
        "flops_useful": flops["useful"],
        "flops_original_algorithm": flops["original"],
        "flops_per_pair_useful": flops["per_pair_useful"],
        "rows": rows,
        "original_run": {
            "a800_days": ORIGINAL_A800_DAYS,
            "a800_bf16_peak": A800_BF16,
            "implied_useful_mfu": flops["useful"] / (original_s * A800_BF16),
            "implied_executed_mfu": flops["original"] / (original_s * A800_BF16),
        },
    }


def token_means(tokenizer: Any, pool_path: str | os.PathLike, tasks_path: str | os.PathLike) -> dict[str, float]:
    """Mean prefix tokens over the whole pool, mean task and response tokens over the tasks (`original`)."""
    from nuggets_jax import data as data_lib

    policy = data_lib.PRESETS["original"]
    template = data_lib.Template()
    pool = data_lib.read_records(pool_path, "pool")
    tasks = data_lib.tokenize_tasks(
        tokenizer, data_lib.read_records(tasks_path, "tasks"), template, policy, str(tasks_path)
    )
    prefixes = data_lib.tokenize_prefixes(tokenizer, pool, template, policy)
    return {
        "prefix_tokens": float(np.mean([len(p) for p in prefixes.ids])),
        "task_tokens": float(np.mean([len(t) for t in tasks.ids])),
        "response_tokens": float(np.mean(tasks.n_tokens)),
    }


def print_projection(result: dict[str, Any]) -> None:
    """Prints `projection`'s result as two tables."""
    print(
        f"paper's full job: {result['pool']:,} candidates x {result['tasks']} tasks, {result['model']}; "
        f"mean tokens: prefix {result['mean_prefix_tokens']:.1f}, task {result['mean_task_tokens']:.1f}, "
        f"response {result['mean_response_tokens']:.1f}"
    )
    print(
        f"FLOPs/token: body {result['body_flops_per_token']:.3g}, LM head {result['lm_head_flops_per_token']:.3g}; "
        f"useful FLOPs {result['flops_useful']:.3g} (per pair {result['flops_per_pair_useful']:.3g}); "
        f"the original loop executes {result['flops_original_algorithm']:.3g}"
    )
    rows = [[r["machine"], r["assumed_mfu"], r["hours"], r["hours"] * 60] for r in result["rows"]]
    print_table(
        ["machine", "assumed MFU", "hours", "minutes"], rows, title="projected time (useful FLOPs / (peak x MFU))"
    )
    original = result["original_run"]
    print(
        f"the original run (10 days on one A800, 312 TFLOP/s bf16) implies {original['implied_useful_mfu']:.1%} "
        f"useful MFU ({original['implied_executed_mfu']:.1%} counting the FLOPs it executes)"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m benchmarks.projection [--model default] [--out projection.json]`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="whose tokenizer counts the tokens (default SmolLM2)")
    parser.add_argument("--pool", default=str(DEFAULT_POOL))
    parser.add_argument("--tasks", default=str(DEFAULT_TASKS))
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.5], help="assumed MFU values")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import transformers

    from nuggets_jax.models import resolve_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(resolve_model_dir(args.model)))
    means = token_means(tokenizer, args.pool, args.tasks)
    result = projection(**means, mfus=args.mfu)
    result["tokenizer"] = args.model
    result["machine"] = machine_info()
    print_projection(result)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
