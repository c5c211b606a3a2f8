"""Strict checkpoint loading, sharded checkpoints, save/load round trip, model paths and fingerprints."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from nuggets_jax.models import (
    CheckpointError,
    Llama,
    ModelConfig,
    ModelConfigError,
    ModelLoadError,
    load_model,
    load_params,
    model_fingerprint,
    save_params,
)

HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 50,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 9)))


@pytest.fixture
def saved(tmp_path) -> tuple[Llama, pathlib.Path]:
    model = Llama(ModelConfig.from_hf(HF_CONFIG), rngs=nnx.Rngs(3))
    save_params(model, tmp_path / "model", HF_CONFIG)
    return model, tmp_path / "model"


def _flat(model: Llama) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_save_load_round_trip_gives_identical_logits(saved):
    model, model_dir = saved
    loaded = load_params(model_dir)
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), np.asarray(model(TOKENS)))


def test_every_mismatch_is_reported_in_one_error(saved):
    _, model_dir = saved
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.rotary.extra"] = np.zeros(3, np.float32)
    tensors["model.norm.weight"] = np.ones(31, np.float32)
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as info:
        load_params(model_dir)
    message = str(info.value)
    assert str(model_dir) in message
    lines = {line.strip().split(" (")[0]: line for line in message.splitlines()[1:]}
    assert "model.layers.1.mlp.up_proj.weight" in lines["missing"]
    assert "model.layers.0.self_attn.rotary.extra [3]" in lines["unexpected"]
    assert "model.norm.weight: [31], expected [32]" in lines["wrong shape"]


def test_unsupported_model_type_names_the_supported_ones(saved):
    _, model_dir = saved
    (model_dir / "config.json").write_text(json.dumps({**HF_CONFIG, "model_type": "gpt2"}))
    with pytest.raises(ModelConfigError, match="'gpt2' is not supported.*llama, mistral, qwen2"):
        load_params(model_dir)


def test_sharded_checkpoint_loads_identically(saved):
    model, model_dir = saved
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in shards.items():
        save_file({n: tensors[n] for n in members}, model_dir / file)
    weight_map = {n: file for file, members in shards.items() for n in members}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (model_dir / "model.safetensors").unlink()
    loaded = load_params(model_dir)
    expected, got = _flat(model), _flat(loaded)
    assert expected.keys() == got.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=str(path))


def test_load_model_path_errors(tmp_path, saved):
    _, model_dir = saved
    with pytest.raises(ModelLoadError, match="nowhere/at/all: no such file or directory"):
        load_model(str(tmp_path / "nowhere/at/all"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty: directory has no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="weights.bin: not a model"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="dtype 'int8' is not supported; use one of float32, bfloat16"):
        load_model(str(model_dir), dtype="int8")
    # No tokenizer files next to the weights.
    with pytest.raises(ModelLoadError, match="transformers cannot load its tokenizer"):
        load_model(str(model_dir))


def test_hub_id_without_hub_access_suggests_local_files(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        load_model("nuggets-test-org/no-such-model")
    message = str(info.value)
    assert "nuggets-test-org/no-such-model: cannot download from the Hugging Face hub" in message
    assert "local HF directory or a .gguf file" in message


def test_model_errors_are_value_errors():
    from nuggets_jax.models import DefaultModelError, GGUFError

    for error in (ModelLoadError, DefaultModelError, GGUFError, CheckpointError, ModelConfigError):
        assert issubclass(error, ValueError)


def test_fingerprint_is_stable_and_tracks_content(saved):
    _, model_dir = saved
    first = model_fingerprint(model_dir)
    assert (model_dir / ".nuggets_fingerprint.json").is_file()
    assert model_fingerprint(model_dir) == first  # from the cache
    cached = json.loads((model_dir / ".nuggets_fingerprint.json").read_text())
    assert set(cached) == {"config.json", "model.safetensors"}

    # Same size, different bytes: the (size, mtime) key must not hide the change.
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    changed = model_fingerprint(model_dir)
    assert changed != first

    (model_dir / "tokenizer.json").write_text("{}")
    assert model_fingerprint(model_dir) != changed
    # The fingerprint is the content: a fresh copy elsewhere (no cache file) gives the same value.
    other = model_dir.parent / "copy"
    other.mkdir()
    for f in model_dir.iterdir():
        if not f.name.startswith("."):
            (other / f.name).write_bytes(f.read_bytes())
    assert model_fingerprint(other) == model_fingerprint(model_dir)
