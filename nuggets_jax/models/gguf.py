"""GGUF (llama.cpp) -> HF model directory, for the Llama family.

The output is what `load_params` and `transformers.AutoTokenizer` read: `config.json`, a float32
`model.safetensors` with HF tensor names, `tokenizer.json` and `tokenizer_config.json`, plus
`source.json` recording which file it came from. Quantized tensors are dequantized with
`gguf.quants`; llama.cpp's Q/K row interleaving (its converter permutes them for the `llama`
architecture so its RoPE can rotate adjacent pairs) is undone. The tokenizer is rebuilt as a
byte-level BPE from the vocabulary, merges and pre-tokenizer name stored in the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np

from nuggets_jax.models.gguf_tokenizer import GGUFError, build_tokenizer

_CONVERTER_VERSION = 1


_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# llama.cpp's converter interleaves Q/K rows for these architectures only (qwen2 keeps HF's order).
_PERMUTED_ARCHS = {"llama", "mistral"}
_ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    **{f"attn_{x}.{kind}": f"self_attn.{x}_proj.{kind}" for x in "qkv" for kind in ("weight", "bias")},
}

_REEXPORT_HINT = "Re-export the model with another quantization (F16, Q8_0, Q4_0, Q4_1, Q5_x or a K-quant)."
# What a finished conversion holds (source.json is written last, before the rename).
CONVERTED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "source.json",
)


def file_sha256(path: str | pathlib.Path, block: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in `block`-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def is_converted(out_dir: str | pathlib.Path) -> bool:
    """True if `out_dir` holds every file of a finished conversion by this converter version."""
    out_dir = pathlib.Path(out_dir)
    if not all((out_dir / name).is_file() for name in CONVERTED_FILES):
        return False
    try:
        source = json.loads((out_dir / "source.json").read_text())
    except (OSError, ValueError):
        return False
    # A converter fix bumps the version, so caches made by older code are converted again.
    return source.get("converter_version") == _CONVERTER_VERSION


@contextlib.contextmanager
def conversion_lock(out_dir: str | pathlib.Path) -> Iterator[None]:
    """Exclusive inter-process lock for converting into `out_dir` (e.g. two hosts on one machine).

    Inside the lock, leftovers of killed conversions into `out_dir` are removed.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for kind in ("partial", "old"):
                for stale in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def convert_gguf(gguf_path: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Converts a llama.cpp GGUF file into a HF-format directory.

    The directory is written under a temporary name next to `out_dir` and renamed at the end,
    so a killed conversion never leaves a directory that looks complete. An existing `out_dir`
    is replaced.

    Args:
      gguf_path: the .gguf file (architecture llama, mistral or qwen2; byte-level BPE tokenizer).
      out_dir: the directory to create.
    Returns:
      `out_dir` as a Path.
    Raises:
      GGUFError: unsupported architecture, tokenizer, pre-tokenizer or tensor type, or a tensor
        the Llama family does not have; the message names the file and the offending item.
    """
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"{gguf_path}: cannot be read as a GGUF file ({e}).") from None
    meta = {name: _field_value(field) for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in _ARCH_TO_MODEL_TYPE:
        raise GGUFError(
            f"{gguf_path}: general.architecture {arch!r} is not supported; nuggets_jax converts "
            f"{', '.join(sorted(_ARCH_TO_MODEL_TYPE))}."
        )
    tensors = {t.name: t for t in reader.tensors}
    _check_tensor_types(gguf_path, tensors)
    hf_config = _hf_config(gguf_path, meta, arch, tensors)
    tokenizer, tokenizer_config = build_tokenizer(gguf_path, meta, hf_config["max_position_embeddings"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_weights(gguf_path, tensors, arch, hf_config, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        source = {
            "gguf": gguf_path.name,
            "sha256": file_sha256(gguf_path),
            "general.name": meta.get("general.name"),
            "converter_version": _CONVERTER_VERSION,
        }
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            shutil.rmtree(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except (ValueError, IndexError, TypeError):
        return None


def _hf_config(path: pathlib.Path, meta: dict[str, Any], arch: str, tensors: dict[str, Any]) -> dict:
    def need(key: str) -> Any:
        value = meta.get(key.format(arch=arch))
        if value is None:
            raise GGUFError(f"{path}: metadata {key.format(arch=arch)} is missing.")
        return value

    hidden, heads = int(need("{arch}.embedding_length")), int(need("{arch}.attention.head_count"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv") or heads)
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported.")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing.")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # GGUF shape [D, V]
    theta = _f32(meta.get(f"{arch}.rope.freq_base") or 10000.0)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(need("{arch}.rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported (linear, llama3).")
    if "rope_freqs.weight" in tensors:
        factors = _dequantize(path, tensors["rope_freqs.weight"]).reshape(-1)
        rope.update(_llama3_rope_from_factors(path, factors, theta, head_dim))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if tokens and len(tokens) > vocab_size:
        raise GGUFError(f"{path}: {len(tokens)} tokens but the embedding has only {vocab_size} rows.")
    config = {
        "architectures": [_ARCH_CLASS[arch]],
        "model_type": _ARCH_TO_MODEL_TYPE[arch],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(need("{arch}.feed_forward_length")),
        "num_hidden_layers": int(need("{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon") or 1e-5),
        "rope_parameters": rope,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length") or 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    else:
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if arch == "mistral":
        window = meta.get(f"{arch}.attention.sliding_window")
        config["sliding_window"] = int(window) if window else None
    return config


def _f32(value: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.9999997e-06; keep the short decimal it came from."""
    return float(str(np.float32(value)))


def _llama3_rope_from_factors(path: pathlib.Path, factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recovers Llama-3 rope scaling parameters from llama.cpp's per-frequency `rope_freqs` factors.

    llama.cpp stores the factor each inverse frequency is divided by instead of the parameters.
    The factor curve depends on (factor, low, high, original length) only through three numbers,
    so low_freq_factor is fixed at 1 and the others are fitted, then checked by recomputing.
    """
    factors = factors.astype(np.float64)  # [Dh/2]
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return {}
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    medium = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if medium.sum() >= 2:
        # In the blend band 1/f = (1 - s)/factor + s, with s linear in 1/wavelength.
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
        high = 1 - 1 / intercept
        params = {"low_freq_factor": 1.0, "high_freq_factor": float(high)}
        params["original_max_position_embeddings"] = round(slope * (high - 1))
    else:
        params = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    params = {"rope_type": "llama3", "factor": factor, **params}
    if not np.allclose(_llama3_factors(params, wavelen), factors, rtol=1e-4):
        raise GGUFError(
            f"{path}: rope_freqs.weight does not follow the Llama-3 rope scaling curve; this "
            "rope scaling is not supported."
        )
    return params


def _llama3_factors(params: dict[str, Any], wavelen: np.ndarray) -> np.ndarray:
    old, low, high = (
        params["original_max_position_embeddings"],
        params["low_freq_factor"],
        params["high_freq_factor"],
    )
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / params["factor"] + smooth)


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _check_tensor_types(path: pathlib.Path, tensors: dict[str, Any]) -> None:
    """Fails before any work if a tensor type cannot be dequantized (tried on one row of each)."""
    bad = []
    for name, tensor in tensors.items():
        try:
            probe = tensor.data[:1] if tensor.data.ndim > 1 else tensor.data  # [1, row bytes]
            gguf.quants.dequantize(probe, tensor.tensor_type)
        except NotImplementedError:
            bad.append((name, tensor.tensor_type.name))
    if bad:
        (name, kind), others = bad[0], [f"{n} ({k})" for n, k in bad[1:4]]
        also = f" (also {', '.join(others)}{' ...' if len(bad) > 4 else ''})" if others else ""
        raise GGUFError(
            f"{path}: tensor {name} has type {kind}, which gguf.quants cannot dequantize{also}. {_REEXPORT_HINT}"
        )


def _dequantize(path: pathlib.Path, tensor: Any) -> np.ndarray:
    """float32 array in numpy order (GGUF lists dims fastest-first, numpy slowest-first)."""
    qtype = tensor.tensor_type
    try:
        array = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise GGUFError(
            f"{path}: tensor {tensor.name} has type {qtype.name}, which gguf.quants cannot dequantize. {_REEXPORT_HINT}"
        ) from None
    return np.asarray(array, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: per head, interleaved (x0, y0, x1, y1..) rows -> (x.., y..)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(path: pathlib.Path, tensors: dict[str, Any], arch: str, config: dict, out: pathlib.Path) -> None:
    """Streams the tensors into a float32 safetensors file, one tensor in memory at a time."""
    names, unknown = {}, []
    for name in tensors:
        if name == "rope_freqs.weight":  # already folded into config.json
            continue
        hf = _hf_name(name)
        if hf is None:
            unknown.append(name)
        else:
            names[name] = hf
    if unknown:
        raise GGUFError(
            f"{path}: tensor(s) the Llama family does not have: {', '.join(unknown[:10])}"
            f"{' ...' if len(unknown) > 10 else ''}."
        )
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, hf in names.items():
        shape = [int(d) for d in reversed(tensors[name].shape)]
        size = 4 * math.prod(shape)
        header[hf] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors data starts 8-byte aligned
    heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
    with open(out, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, hf in names.items():
            array = _dequantize(path, tensors[name])
            proj = hf.split(".")[-2]  # q_proj, k_proj, ...
            if arch in _PERMUTED_ARCHS and proj in ("q_proj", "k_proj"):
                array = _unpermute(array, heads[proj[0]])
            f.write(np.ascontiguousarray(array, "<f4").tobytes())
