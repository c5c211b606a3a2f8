"""Llama-family models: one `load_model` for "default", HF directories, GGUF files and hub ids."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pathlib
import re
import sys
from typing import Any

import jax.numpy as jnp

from nuggets_jax.errors import UserError
from nuggets_jax.models.attention import TaskWindows
from nuggets_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, ModelConfigError
from nuggets_jax.models.default import DefaultModelError, cache_root, ensure_default_model
from nuggets_jax.models.gguf import GGUFError, conversion_lock, convert_gguf, file_sha256, is_converted
from nuggets_jax.models.llama import Llama, PrefixCache
from nuggets_jax.models.params import CheckpointError, checkpoint_files, load_params, save_params
from nuggets_jax.store import StoreError, atomic_write_bytes

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "DefaultModelError",
    "GGUFError",
    "Llama",
    "LoadedModel",
    "ModelConfig",
    "ModelConfigError",
    "ModelLoadError",
    "PrefixCache",
    "TaskWindows",
    "convert_gguf",
    "ensure_default_model",
    "load_model",
    "load_params",
    "model_fingerprint",
    "resolve_dtype",
    "resolve_model_dir",
    "save_params",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str, platform: str) -> str:
    """A config's parameter dtype: "auto" = float32 on CPU, bfloat16 on GPU/TPU (log-probs are float32 always)."""
    if name == "auto":
        return "float32" if platform == "cpu" else "bfloat16"
    return name


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FINGERPRINT_CACHE = ".nuggets_fingerprint.json"


class ModelLoadError(UserError):
    """A model path that is not a usable model."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: parameters, tokenizer and where they came from."""

    model: Llama
    tokenizer: Any  # a transformers tokenizer
    model_dir: pathlib.Path
    config: ModelConfig
    hf_config: dict


def resolve_model_dir(path: str) -> pathlib.Path:
    """The local HF directory for `path`, fetching or converting it first if needed.

    Args:
      path: "default"; a HF directory; a .gguf file (converted once into the cache, keyed by its
        sha256); or a hub id "org/name" (downloaded with huggingface_hub).
    Raises:
      ModelLoadError: `path` is none of these, or the hub cannot be reached.
    """
    if path == "default":
        return ensure_default_model()
    local = pathlib.Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{local}: directory has no config.json; a model directory needs HF config.json, "
                "*.safetensors and tokenizer files (or pass a .gguf file)."
            )
        return local
    if local.is_file():
        if local.suffix != ".gguf":
            raise ModelLoadError(f"{local}: not a model; pass a HF directory, a .gguf file or 'default'.")
        out_dir = cache_root() / "gguf" / f"{local.stem}-{file_sha256(local)[:16]}"
        with conversion_lock(out_dir):
            if not is_converted(out_dir):
                print(f"nuggets_jax: converting {local} -> {out_dir} (once)", file=sys.stderr, flush=True)
                convert_gguf(local, out_dir)
        return out_dir
    if _HUB_ID.fullmatch(path):
        return _from_hub(path)
    raise ModelLoadError(
        f"{path}: no such file or directory; pass 'default', a HF directory, a .gguf file or a hub id org/name."
    )


def _from_hub(repo_id: str) -> pathlib.Path:
    import huggingface_hub

    try:
        local = huggingface_hub.snapshot_download(repo_id, allow_patterns=[*_HUB_PATTERNS, *TOKENIZER_FILES])
    # Offline, DNS, auth and missing-repo errors come from several libraries; all mean "not fetched".
    except Exception as e:
        raise ModelLoadError(
            f"{repo_id}: cannot download from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Without hub access pass a local HF directory or a .gguf file instead."
        ) from None
    return pathlib.Path(local)


def load_model(path: str = "default", dtype: str = "float32", mesh=None, replicate_kv: bool = True) -> LoadedModel:
    """Loads model parameters and tokenizer (see `resolve_model_dir` for what `path` may be).

    Args:
      path: model location.
      dtype: parameter dtype, "float32", "bfloat16", "float16" or "auto" (`resolve_dtype`).
      mesh: put the parameters straight into their layout on this (data, model) mesh, each process
        reading only its own slices (`load_params`); default: on the default device.
      replicate_kv: with a mesh, repeat KV heads where that lets the attention split over `model`
        (for scoring; training passes False). `LoadedModel.model.config` then has the repeated
        count, `LoadedModel.config` the file's.
    Raises:
      ValueError (ModelLoadError, DefaultModelError, GGUFError, ModelConfigError, CheckpointError):
        a path, file or checkpoint that cannot be used; the message names it.
    """
    import jax

    dtype = resolve_dtype(dtype, jax.default_backend())
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)} (or auto).")
    model_dir = resolve_model_dir(path)
    hf_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config = ModelConfig.from_hf(hf_config, source=str(model_dir / "config.json"))
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{model_dir}: transformers cannot load its tokenizer ({e}).") from None
    if len(tokenizer) > config.vocab_size:
        raise ModelLoadError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but config.json vocab_size is "
            f"{config.vocab_size}; tokenizer and weights do not belong together."
        )
    model = load_params(model_dir, config, dtype=DTYPES[dtype], mesh=mesh, replicate_kv=replicate_kv)
    return LoadedModel(model, tokenizer, model_dir, config, hf_config)


def model_fingerprint(model_dir: str | pathlib.Path) -> str:
    """sha256 over config.json, the safetensors files and the tokenizer files of a model directory.

    Per-file digests are cached in `.nuggets_fingerprint.json` in the directory, keyed by
    (size, mtime), so a large checkpoint is hashed once.
    """
    model_dir = pathlib.Path(model_dir)
    files = [model_dir / "config.json", *checkpoint_files(model_dir)]
    files += [model_dir / n for n in ("model.safetensors.index.json", *TOKENIZER_FILES)]
    cache_path = model_dir / _FINGERPRINT_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    fresh, total = {}, hashlib.sha256()
    for file in sorted({f for f in files if f.is_file()}):
        stat = file.stat()
        key = [stat.st_size, stat.st_mtime_ns]
        known = cache.get(file.name)
        digest = known[2] if known and known[:2] == key else file_sha256(file)
        fresh[file.name] = [*key, digest]
        total.update(f"{file.name}\0{digest}\n".encode())
    if fresh != cache:
        # A read-only directory (e.g. a shared hub cache) just is not cached.
        # Atomic, so the processes of a multi-host run starting together never read half a file.
        with contextlib.suppress(OSError, StoreError):
            atomic_write_bytes(cache_path, json.dumps(fresh, indent=1).encode())
    return total.hexdigest()
