"""GGUF -> HF conversion: small GGUFs written the way llama.cpp writes them, converted back."""

import json
import math
import os
import pathlib
import subprocess
import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import decoders, pre_tokenizers, trainers

from nuggets_jax import models
from nuggets_jax.models import (
    GGUFError,
    Llama,
    ModelConfig,
    convert_gguf,
    gguf_tokenizer,
    load_model,
    load_params,
    save_params,
)
from nuggets_jax.models import gguf as gguf_module

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Instruction:\nConvert 3.5 kilometres to metres.\nResponse:\n3,500 metres.",
    "In 1969, astronauts landed on the Moon; it's a fact, isn't it?",
    "Water boils at 100 degrees   Celsius\t\tat sea level.",
    "Café crème, naïve façade: 東京 🙂 and  double  spaces.",
]
TEXTS = [
    *SENTENCES,
    "<|im_start|>user\nHello 12345 world<|im_end|>",
    "  leading and trailing spaces  \n\n",
    "unseen: Zebra ξ 😀 ß 2048",
    "a <extra> b",
]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
# GGUF tensor name for each HF name, llama.cpp's naming.
_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    **{f"self_attn.{x}_proj.{k}": f"attn_{x}.{k}" for x in "qkv" for k in ("weight", "bias")},
    "self_attn.o_proj.weight": "attn_output.weight",
}


def train_tokenizer(pre: str) -> tokenizers.Tokenizer:
    """A tiny byte-level BPE with SmolLM's special tokens and one user-defined token."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    tokenizer.add_tokens([tokenizers.AddedToken("<extra>", normalized=False)])
    return tokenizer


def hf_config(arch: str, vocab_size: int, rope: dict | None = None, tied: bool = False) -> dict:
    return {
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_parameters": rope or {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": tied,
        "max_position_embeddings": 256,
    }


def source_model(config: dict, directory: pathlib.Path) -> dict[str, np.ndarray]:
    """A random model with every weight (biases and norms too) away from its init; HF tensors."""
    model = Llama(ModelConfig.from_hf(config), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for _, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        param[...] = param[...] + 0.05 * rng.standard_normal(param.shape).astype(np.float32)
    save_params(model, directory, config)
    return load_file(directory / "model.safetensors")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute: rotate-half rows -> interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency factors llama.cpp stores as rope_freqs.weight for Llama-3 rope scaling."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def write_gguf(
    path: pathlib.Path,
    config: dict,
    tensors: dict[str, np.ndarray],
    tokenizer: tokenizers.Tokenizer,
    *,
    arch: str = "llama",
    qtype: gguf.GGMLQuantizationType = Q.F32,
    pre: str = "smollm",
    add_bos: bool = False,
    tokenizer_model: str = "gpt2",
    rope_freqs: np.ndarray | None = None,
    raw_overrides: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
) -> pathlib.Path:
    """Writes `tensors` (HF names and layout) as llama.cpp would: renamed, Q/K permuted, quantized."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    types = [3 if t in SPECIALS else 4 if t == "<extra>" else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for hf_name, array in tensors.items():
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name = "output.weight"
        else:
            layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{layer}.{_GGUF_NAMES[rest]}"
        if arch == "llama" and ("q_proj" in hf_name or "k_proj" in hf_name):
            array = llama_cpp_permute(array, heads if "q_proj" in hf_name else kv_heads)
        if raw_overrides and name in raw_overrides:
            data, raw = raw_overrides[name]
            writer.add_tensor(name, data, raw_dtype=raw)
        elif array.ndim == 2 and qtype != Q.F32:
            data = gguf.quants.quantize(np.ascontiguousarray(array), qtype)
            # Block formats are written as raw bytes; F16 as a float16 array.
            writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        else:  # llama.cpp keeps norms and biases in F32
            writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def smollm_tokenizer() -> tokenizers.Tokenizer:
    return train_tokenizer("smollm")


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory, smollm_tokenizer):
    """(config, HF tensors, source dir) of a tiny untied llama."""
    directory = tmp_path_factory.mktemp("llama_source")
    config = hf_config("llama", smollm_tokenizer.get_vocab_size())
    return config, source_model(config, directory), directory


def _logits(model_dir: pathlib.Path) -> np.ndarray:
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 300, (2, 11)))
    return np.asarray(load_params(model_dir)(tokens))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_f32_conversion_is_exact(tmp_path, smollm_tokenizer, arch, tied):
    config = hf_config(arch, smollm_tokenizer.get_vocab_size(), tied=tied)
    tensors = source_model(config, tmp_path / "source")
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in tensors
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer, arch=arch)
    out = convert_gguf(path, tmp_path / "converted")
    converted = load_file(out / "model.safetensors")
    assert converted.keys() == tensors.keys()
    for name, array in tensors.items():
        assert converted[name].dtype == np.float32
        np.testing.assert_array_equal(converted[name], array, err_msg=name)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == arch
    assert written["tie_word_embeddings"] == tied
    assert ModelConfig.from_hf(written) == ModelConfig.from_hf({**config, "bos_token_id": 1, "eos_token_id": 2})
    np.testing.assert_allclose(_logits(out), _logits(tmp_path / "source"), atol=1e-5, rtol=0)


def _relative_rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))


# Relative RMS error bounds of weights and logits, about 2-3x what each format measured on this
# model (logits amplify the weight error ~3x); a wrong Q/K row order gives a weight error ~1.4.
@pytest.mark.parametrize(
    "qtype,weight_tol,logit_tol",
    [
        (Q.F16, 1e-3, 2e-3),
        (Q.BF16, 5e-3, 1.5e-2),
        (Q.Q8_0, 1.5e-2, 4e-2),
        (Q.Q4_0, 0.15, 0.4),
        (Q.Q4_1, 0.15, 0.4),
    ],
    ids=lambda v: v.name if isinstance(v, Q) else str(v),
)
def test_quantized_conversion_within_tolerance(tmp_path, smollm_tokenizer, llama_source, qtype, weight_tol, logit_tol):
    config, tensors, source_dir = llama_source
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer, qtype=qtype)
    matrices = sum(array.ndim == 2 for array in tensors.values())
    assert sum(t.tensor_type == qtype for t in gguf.GGUFReader(path).tensors) == matrices
    out = convert_gguf(path, tmp_path / "converted")
    converted = load_file(out / "model.safetensors")
    for name, array in tensors.items():
        error = _relative_rms(converted[name], array)
        assert error < weight_tol, (name, error)
        if array.ndim == 2:
            assert error > 0  # really quantized
    assert _relative_rms(_logits(out), _logits(source_dir)) < logit_tol


@pytest.mark.parametrize(
    "rope",
    [
        # A wide blend band (3 frequencies): factor, high_freq_factor and length are fitted.
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0, original_max_position_embeddings=512),
        # A band with one frequency (Llama 3.1's own parameters on a tiny head): the standard ones fit.
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    ],
)
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, smollm_tokenizer, rope):
    theta = 1000.0 if rope["original_max_position_embeddings"] == 512 else 500000.0
    rope = {"rope_type": "llama3", "rope_theta": theta, **rope}
    config = hf_config("llama", smollm_tokenizer.get_vocab_size(), rope=rope)
    tensors = source_model(config, tmp_path / "source")
    factors = llama3_rope_factors(rope, theta, head_dim=16)
    assert factors.max() > 1 and factors.min() == 1
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer, rope_freqs=factors)
    out = convert_gguf(path, tmp_path / "converted")
    written = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert written["rope_type"] == "llama3" and written["factor"] == 8.0
    np.testing.assert_allclose(llama3_rope_factors(written, theta, 16), factors, rtol=1e-5)  # the same scaling curve
    assert "rope_freqs.weight" not in load_file(out / "model.safetensors")
    np.testing.assert_allclose(_logits(out), _logits(tmp_path / "source"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pre", ["smollm", "gpt2"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_encodes_like_the_source(tmp_path, llama_source, pre, add_bos):
    config, tensors, _ = llama_source
    source = train_tokenizer(pre)
    path = write_gguf(tmp_path / "m.gguf", config, tensors, source, pre=pre, add_bos=add_bos)
    out = convert_gguf(path, tmp_path / "converted")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        expected = source.encode(text).ids
        ids = tokenizer(text)["input_ids"]
        assert ids == ([1] if add_bos else []) + expected, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == ("<|im_start|>" if add_bos else "") + text
    assert tokenizer.convert_tokens_to_ids(SPECIALS) == [0, 1, 2]
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.decode(tokenizer("x <|im_end|>")["input_ids"], skip_special_tokens=True) == "x "
    assert tokenizer.chat_template == CHAT_TEMPLATE
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["add_bos_token"] is add_bos
    assert written["model_max_length"] == config["max_position_embeddings"]


# Pieces worked out by hand from llama.cpp's regexes (Ġ is a space, Ċ a newline, byte-level).
_PIECES = {
    "gpt2": ["Hi", "Ġ", "Ġthere", "Ġ2024", "!", "Ċ", "Ċ", "OK", "'s"],
    "smollm": ["Hi", "Ġ", "Ġthere", "Ġ", "2", "0", "2", "4", "!", "Ċ", "Ċ", "OK", "'s"],
    "llama-bpe": ["Hi", "Ġ", "Ġthere", "Ġ", "202", "4", "!ĊĊ", "OK", "'s"],
    "qwen2": ["Hi", "Ġ", "Ġthere", "Ġ", "2", "0", "2", "4", "!ĊĊ", "OK", "'s"],
}


@pytest.mark.parametrize("pre", sorted(_PIECES))
def test_pre_tokenizer_splits(pre):
    make, _ = gguf_tokenizer._PRE_TOKENIZERS[pre]
    pieces = [piece for piece, _ in make().pre_tokenize_str("Hi  there 2024!\n\nOK's")]
    assert pieces == _PIECES[pre]
    assert set(gguf_tokenizer.SUPPORTED_PRE_TOKENIZERS) == set(_PIECES)


def test_unknown_pre_tokenizer_lists_supported(tmp_path, smollm_tokenizer, llama_source):
    config, tensors, _ = llama_source
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer, pre="falcon")
    with pytest.raises(GGUFError, match="m.gguf: tokenizer.ggml.pre 'falcon' is not supported.*gpt2, llama-bpe"):
        convert_gguf(path, tmp_path / "converted")


def test_sentencepiece_tokenizer_is_refused(tmp_path, smollm_tokenizer, llama_source):
    config, tensors, _ = llama_source
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer, tokenizer_model="llama")
    with pytest.raises(GGUFError, match="tokenizer.ggml.model 'llama' is not supported"):
        convert_gguf(path, tmp_path / "converted")


def test_unsupported_architecture(tmp_path, smollm_tokenizer, llama_source):
    config, tensors, _ = llama_source
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer, arch="gpt2")
    with pytest.raises(GGUFError, match="general.architecture 'gpt2' is not supported; .* llama, mistral, qwen2"):
        convert_gguf(path, tmp_path / "converted")


def test_unsupported_quant_type_names_file_tensor_and_type(tmp_path, smollm_tokenizer, llama_source):
    config, tensors, _ = llama_source
    rows, cols = tensors["model.layers.1.mlp.up_proj.weight"].shape
    block, block_bytes = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((rows, cols // block * block_bytes), np.uint8)
    overrides = {"blk.1.ffn_up.weight": (raw, Q.Q8_1)}
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer, raw_overrides=overrides)
    with pytest.raises(GGUFError, match=r"m.gguf: tensor blk.1.ffn_up.weight has type Q8_1, which gguf.quants"):
        convert_gguf(path, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
    assert not list(tmp_path.glob(".converted*"))


def test_interrupted_conversion_leaves_nothing_that_looks_done(tmp_path, smollm_tokenizer, llama_source, monkeypatch):
    config, tensors, _ = llama_source
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "_write_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
    assert not list(tmp_path.glob(".converted*"))
    assert not gguf_module.is_converted(tmp_path / "converted")


def test_load_model_converts_a_gguf_once(tmp_path, smollm_tokenizer, llama_source, monkeypatch):
    config, tensors, source_dir = llama_source
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer)
    monkeypatch.setenv("NUGGETS_CACHE", str(tmp_path / "cache"))
    calls = []

    def counting(*args):
        calls.append(args)
        return convert_gguf(*args)

    monkeypatch.setattr(models, "convert_gguf", counting)
    loaded = load_model(str(path))
    again = load_model(str(path))
    assert len(calls) == 1
    assert loaded.model_dir == again.model_dir
    assert loaded.model_dir.parent == tmp_path / "cache" / "gguf"
    assert loaded.config == ModelConfig.from_file(loaded.model_dir / "config.json")
    assert loaded.hf_config["model_type"] == "llama"
    assert loaded.tokenizer("Hello 12")["input_ids"] == smollm_tokenizer.encode("Hello 12").ids
    tokens = jnp.asarray([[5, 6, 7, 8]])
    np.testing.assert_allclose(
        np.asarray(loaded.model(tokens)), np.asarray(load_params(source_dir)(tokens)), atol=1e-5, rtol=0
    )
    # The converted directory loads as a plain HF directory too, in bfloat16 if asked.
    as_dir = load_model(str(loaded.model_dir), dtype="bfloat16")
    assert as_dir.model.embed[...].dtype == jnp.bfloat16


def test_two_processes_converting_at_once_agree(tmp_path, smollm_tokenizer, llama_source):
    config, tensors, _ = llama_source
    path = write_gguf(tmp_path / "m.gguf", config, tensors, smollm_tokenizer)
    env = {**os.environ, "NUGGETS_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    code = "import sys; from nuggets_jax.models import resolve_model_dir; print(resolve_model_dir(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert gguf_module.is_converted(outputs[0])
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == [
        pathlib.Path(outputs[0]).name
    ]
