"""Frozen model configuration of the Llama family, built from a HF `config.json`; the model's FLOP count."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from nuggets_jax.errors import UserError

# model_type in config.json -> the HF class it must match (for messages and parity tests).
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


class ModelConfigError(UserError):
    """A config.json that nuggets_jax cannot run."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "llama3" or "linear"."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs; hashable so it can be a static jit argument."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads

    # -- model FLOPs: the one count behind every FLOP figure -------------------------------------
    # `Engine.pair_flops` and the adaptive rounds report it, the block plan weighs prefix widths
    # with it, the benchmarks and the full-job projection are built on it. Only matmuls count,
    # 2 FLOPs per multiply-add: the body on every real token, the LM head on the positions that
    # predict a scored response token, scores and weighted values per (query, key) pair. Norms,
    # RoPE, softmax and padding are left out: the FLOPs the model needs, not what a padded batch
    # executes. Lengths may be fractional (the benchmarks pass means).

    def flops_per_token(self, lm_head: bool = True) -> float:
        """Matmul FLOPs of one token through the body (+ LM head), attention scores excluded."""
        d, f = self.hidden_size, self.intermediate_size
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = qkv + self.num_heads * self.head_dim * d + 3 * d * f
        total = self.num_layers * per_layer + (self.vocab_size * d if lm_head else 0)
        return 2.0 * total

    def attention_flops(self, query_tokens, key_tokens):
        """FLOPs of scores and weighted values for `query_tokens` x `key_tokens` pairs, all layers.

        Either argument may be an array (elementwise).
        """
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * query_tokens * key_tokens

    def prefix_flops(self, prefix_length: float) -> float:
        """FLOPs of encoding one candidate's prefix: the body on every token, causal attention."""
        p = float(prefix_length)
        return p * self.flops_per_token(lm_head=False) + self.attention_flops(p, (p + 1) / 2)

    def task_flops(self, prefix_length: float, task_lengths: ArrayLike, response_tokens: ArrayLike) -> float:
        """FLOPs of task sequences after one cached prefix (the prefix's own encoding excluded).

        Every task token goes through the body and attends to the whole prefix and causally to
        its own task; only the positions predicting a scored response token reach the LM head.

        Args:
          prefix_length: real tokens of the prefix the tasks follow (0 = zero-shot).
          task_lengths: [T] tokens of each task sequence (prompt ++ response, after the cut).
          response_tokens: [T] scored response tokens of each task (length - response start).
        """
        body = self.flops_per_token(lm_head=False)
        head = self.flops_per_token() - body
        n = np.asarray(task_lengths, np.float64)
        p = float(prefix_length)
        scored = float(np.sum(np.asarray(response_tokens, np.float64)))
        return float(n.sum() * body + scored * head + np.sum(self.attention_flops(n, p + (n + 1) / 2)))

    def candidate_flops(self, prefix_length: float, task_lengths: ArrayLike, response_tokens: ArrayLike) -> float:
        """FLOPs of one candidate: its prefix encoded once, then every task after it (args as `task_flops`)."""
        return float(self.prefix_flops(prefix_length) + self.task_flops(prefix_length, task_lengths, response_tokens))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Builds the config from a parsed HF `config.json` (transformers 4.x and 5.x layouts)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            raise ModelConfigError(
                f"{source}: model_type {model_type!r} is not supported; nuggets_jax runs the Llama "
                f"family: {supported} (SmolLM checkpoints use model_type 'llama')."
            )
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in hf
        ]
        if missing:
            raise ModelConfigError(f"{source}: missing field(s) {', '.join(missing)}.")
        num_heads = int(hf["num_attention_heads"])
        num_kv_heads = int(hf.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ModelConfigError(
                f"{source}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}."
            )
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // num_heads)
        # transformers 5 moved rope_theta / rope_scaling into `rope_parameters`.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        rope_scaling = _rope_scaling(scaling, source)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        sliding_window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding_window = None
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=int(sliding_window) if sliding_window else None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
        )

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> ModelConfig:
        path = pathlib.Path(path)
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelConfigError(f"{path}: not found; a model directory needs a HF config.json.") from None
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
        return cls.from_hf(hf, source=str(path))


def _rope_scaling(scaling: dict[str, Any] | None, source: str) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(scaling["factor"]))
    raise ModelConfigError(f"{source}: rope scaling type {kind!r} is not supported (llama3, linear).")
