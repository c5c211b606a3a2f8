"""The GPU benchmark's tiny CPU path: both systems in their own processes, the same weights, equal scores."""

import json
import math

import numpy as np
import pytest

from benchmarks import gpu


@pytest.mark.slow  # two interpreters start and compile: about 25 s
def test_tiny_run_agrees_and_reports(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "gpu.json"
    gpu.main(["--shapes", "tiny", "--out", str(out)])
    written = json.loads(out.read_text())
    tiny = written["results"]["tiny"]
    for system in ("nuggets_jax", "torch"):
        result = tiny[system]
        assert "error" not in result, result
        assert result["pairs"] == result["candidates"] * result["tasks"] > 0
        assert math.isfinite(result["pairs_per_s"]) and result["pairs_per_s"] > 0
        assert math.isfinite(result["useful_flops_per_s"]) and result["useful_flops_per_s"] > 0
    assert tiny["nuggets_jax"]["compiles_after_warmup"] == 0
    assert math.isfinite(tiny["speedup_over_torch"])
    agreement = tiny["agreement"]
    assert agreement["candidates"] == 4
    assert agreement["n_tokens_equal"]
    assert agreement["max_abs_diff_per_token_one"] < 1e-3
    assert agreement["max_abs_diff_per_token_zero"] < 1e-3
    assert agreement["win_rates_identical"]
    # The prefix moves the scores: not every candidate wins or loses every task.
    assert 0 < np.mean(agreement["win_rate_torch"]) < 1
    assert tiny["targets"] == {}  # the targets are for the GPU shapes
    assert written["machine"]["python"] and written["shapes"]["tiny"]["dtype"] == "float32"


def test_synthetic_inputs_have_the_measured_lengths():
    shape = gpu.SHAPES["1b"]
    lengths = json.loads(gpu.TASK_LENGTHS.read_text())
    tasks, starts, prefixes = gpu.synthetic_inputs(shape, 70, seed=3)
    assert [len(t) for t in tasks] == lengths["task_lengths"] and len(tasks) == 100
    np.testing.assert_array_equal(starts, lengths["response_starts"])
    assert [len(p) for p in prefixes] == [lengths["prefix_lengths"][c % 64] for c in range(70)]
    assert max(int(t.max()) for t in tasks) < shape.hf["vocab_size"]
    # The torch worker draws fewer candidates than the JAX worker: they must be the first ones, same ids.
    fewer = gpu.synthetic_inputs(shape, 5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(tasks, fewer[0], strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(prefixes[:5], fewer[2], strict=True))
    tiny_tasks, tiny_starts, _ = gpu.synthetic_inputs(gpu.SHAPES["tiny"], 2, seed=3)
    assert all(0 < s < len(t) <= 40 for t, s in zip(tiny_tasks, tiny_starts, strict=True))


def test_peak_flops_by_device_kind():
    assert gpu.peak_flops("NVIDIA H200", None) == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert gpu.peak_flops("NVIDIA L4", None) == 121e12
    assert gpu.peak_flops("cpu", None) is None
    assert gpu.peak_flops("cpu", 100.0) == 100e12


def test_random_llama_is_the_configured_model():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nuggets_jax.models import ModelConfig

    config = ModelConfig.from_hf(gpu.SHAPES["tiny"].hf)
    model = gpu.random_llama(config, jnp.float32, seed=0)
    assert model.config == config and model.lm_head is None  # tied, as the 1B shape
    leaves = jax.tree.leaves(nnx.state(model))
    assert sum(x.size for x in leaves) == 512 * 64 + 2 * (2 * 64 + 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128) + 64
    assert all(bool(jnp.isfinite(x).all()) for x in leaves)
    assert float(jnp.std(model.embed[...])) > 0.01
