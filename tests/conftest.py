"""Test setup: 8 fake CPU devices for sharding tests, float32 matmuls, shared data paths."""

import os

# Must happen before jax initialises its backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (tests that read public data need ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def golden_fixture() -> pathlib.Path:
    path = FIXTURES / "smollm2_golden.json"
    if not path.is_file():
        pytest.skip(f"golden fixture not found at {path}")
    return path


# -- a tiny HF-format model directory (random weights, small byte-level BPE) ------------------------

_TOKENIZER_TEXT = [
    "Instruction:\nAdd 2 and 3.\nResponse:\n2 plus 3 is 5.",
    "Instruction:\nConvert 4 km to metres.\nInput:\n4 km\nResponse:\n4 km is 4000 metres.",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Reverse the word apple. The reversed word is elppa. Sort these words alphabetically.",
]


def build_tiny_model_dir(
    directory: pathlib.Path,
    add_bos: bool,
    vocab_size: int = 320,
    seed: int = 0,
    *,
    model_type: str = "llama",
    hidden_size: int = 32,
    intermediate_size: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    sliding_window: int | None = None,
    tie_word_embeddings: bool = False,
) -> pathlib.Path:
    """Writes config.json, model.safetensors and tokenizer files of a tiny random Llama-family model.

    The keyword arguments change the architecture (`model_type` "llama", "mistral" or "qwen2"; a
    qwen2 model has q/k/v biases, given random values so they matter; `sliding_window` turns the
    window on for every type); the defaults are the tiny Llama the other tests use.
    """
    import json

    import tokenizers
    from flax import nnx
    from tokenizers import decoders, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from nuggets_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
    from nuggets_jax.models.llama import Llama
    from nuggets_jax.models.params import save_params

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_TEXT * 4, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(directory))
    hf_config = {
        "model_type": model_type,
        "architectures": [SUPPORTED_MODEL_TYPES[model_type]],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if sliding_window is not None:
        hf_config["sliding_window"] = sliding_window
        if model_type == "qwen2":
            hf_config["use_sliding_window"] = True
    model = Llama(ModelConfig.from_hf(hf_config), rngs=nnx.Rngs(seed))
    # Larger weights than the default init so log-probs depend visibly on the context.
    state = nnx.state(model, nnx.Param)
    scaled = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, state)
    nnx.update(model, scaled)
    biases = [name for name in ("q_bias", "k_bias", "v_bias") if getattr(model.layers, name, None) is not None]
    for i, name in enumerate(biases):  # zero at init; random so that sharding them is tested
        bias = getattr(model.layers, name)
        bias[...] = 0.5 * jax.random.normal(jax.random.key(seed + 1 + i), bias[...].shape, bias[...].dtype)
    save_params(model, directory, hf_config)
    (directory / "config.json").write_text(json.dumps(hf_config))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random Llama whose tokenizer adds no special tokens (like SmolLM2)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), add_bos=False)


@pytest.fixture(scope="session")
def tiny_bos_model_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random Llama whose tokenizer puts <s> in front of every text (like Llama 2/3)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_bos_model"), add_bos=True)
