"""The `original` preset against the independent PyTorch implementation of the original algorithm."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks import torch_baseline
from nuggets_jax.models import load_model, resolve_model_dir
from nuggets_jax.scoring import job as job
from nuggets_jax.synthetic import generate as synthetic


def _compare(model_dir, candidates, tasks, tmp_path, per_token_tol):
    from configs import score as score_config

    (tmp_path / "pool.json").write_text(json.dumps(candidates))
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    config = score_config.get_config("preset=original")
    config.model.path = str(model_dir)
    config.data.pool, config.data.tasks = str(tmp_path / "pool.json"), str(tmp_path / "tasks.json")
    config.progress = config.report = False
    job.run_score(config, tmp_path / "w", log=lambda m: None)
    with np.load(tmp_path / "w" / "scores.npz") as z:
        ours = {k: z[k] for k in z.files}

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = load_model(str(model_dir)).tokenizer
    ref = torch_baseline.score_original(model, tokenizer, candidates, tasks, task_batch=4, progress=False)
    n = ref["n_tokens"].astype(np.float64)
    np.testing.assert_array_equal(ours["n_tokens"], ref["n_tokens"])
    assert (np.abs(ours["zero_logp"] - ref["zero_logp"]) / n).max() <= per_token_tol
    per_token = np.abs(ours["one_logp"] - ref["one_logp"]) / n
    assert per_token.max() <= per_token_tol, per_token.max()
    np.testing.assert_array_equal(ours["zero_correct"], ref["zero_correct"])
    np.testing.assert_array_equal(ours["one_correct"], ref["one_correct"])
    ours_win = (ours["one_logp"] > ours["zero_logp"]).mean(axis=1)
    np.testing.assert_array_equal(ours_win, torch_baseline.win_rate(ref["one_logp"], ref["zero_logp"]))
    return ours


def test_original_preset_matches_torch_on_tiny_model(tiny_bos_model_dir, tmp_path):
    pool = synthetic.generate_pool(12, seed=5)
    tasks = synthetic.generate_tasks(7, seed=6)
    tasks[0]["output"] = " ".join(["and then it went on"] * 60)  # longer than the 200-token cut
    ours = _compare(tiny_bos_model_dir, pool, tasks, tmp_path, per_token_tol=1e-5)
    assert np.ptp(ours["one_logp"], axis=0).max() > 0.1


@pytest.mark.integration
def test_original_preset_matches_torch_on_default_model(shared_data, tmp_path):
    pool = json.loads((shared_data / "nuggets" / "alpaca_gpt4_bad.json").read_text())[:3]
    tasks = json.loads((shared_data / "nuggets" / "alpaca_gpt4_kmeans_100.json").read_text())
    lengths = [len(t["output"]) for t in tasks]
    # The shortest tasks (fast) and the longest one (cut at 200 tokens).
    chosen = [tasks[i] for i in np.argsort(lengths)[:6]] + [tasks[int(np.argmax(lengths))]]
    _compare(resolve_model_dir("default"), pool, chosen, tmp_path, per_token_tol=1e-3)
