"""The byte-level BPE tokenizer of a GGUF file, rebuilt with the `tokenizers` library.

llama.cpp stores the vocabulary, the merges, token types and the name of its pre-tokenizer; this
module turns them into a `tokenizers.Tokenizer` plus transformers' tokenizer_config, so the converted
directory tokenizes exactly as llama.cpp does.
"""

from __future__ import annotations

import pathlib
from typing import Any

import tokenizers
from tokenizers import decoders, pre_tokenizers, processors

from nuggets_jax.errors import UserError


class GGUFError(UserError):
    """A GGUF file that cannot be converted (wrong architecture, tokenizer or tensor type)."""


# Byte-level pre-tokenizer regexes, as llama.cpp applies them for each `tokenizer.ggml.pre`.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# name -> (pre-tokenizer factory, ignore_merges: a whole word in the vocabulary skips BPE, as llama.cpp)
_PRE_TOKENIZERS = {
    "gpt2": (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False),
    "smollm": (
        lambda: pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ),
        False,
    ),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3_REGEX), True),
    "qwen2": (lambda: _split_then_bytes(_QWEN2_REGEX), False),
}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def build_tokenizer(
    path: pathlib.Path, meta: dict[str, Any], context_length: int
) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """Byte-level BPE `tokenizers.Tokenizer` + transformers' tokenizer_config from GGUF metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(
            f"{path}: tokenizer.ggml.model {model!r} is not supported; only byte-level BPE ('gpt2', "
            "used by Llama 3, Qwen2, SmolLM) can be rebuilt. Use the model's HF directory instead."
        )
    pre = meta.get("tokenizer.ggml.pre") or "gpt2"
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported pre-tokenizers: "
            f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}. Use the model's HF directory instead."
        )
    make_pre, ignore_merges = _PRE_TOKENIZERS[pre]
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = []
    for i, merge in enumerate(meta.get("tokenizer.ggml.merges") or []):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise GGUFError(f"{path}: tokenizer.ggml.merges[{i}] = {merge!r} is not 'left right'.")
        merges.append((pair[0], pair[1]))
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a duplicate keeps its first id, as llama.cpp's text->id map
    tokenizer = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False)
    )
    tokenizer.pre_tokenizer = make_pre()
    tokenizer.decoder = decoders.ByteLevel()
    special = [
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _TOKEN_CONTROL
    ]
    user = [
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _TOKEN_USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    steps: list[processors.PostProcessor] = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        steps.append(processors.TemplateProcessing(single=single, pair=f"{single} {pair}", special_tokens=specials))
    tokenizer.post_processor = processors.Sequence(steps)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": context_length,
        # Decoding must give back the exact text (no " ." -> "." clean-up).
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, config
