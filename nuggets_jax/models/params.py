"""Loading HF checkpoints (config.json + safetensors, sharded or not) into the NNX Llama.

The model is built by abstract shapes (`nnx.eval_shape`, no memory), each HF tensor is mapped
by a regex key table to a parameter (and a layer index for the stacked layers), transposed where
HF stores [out, in], and checked against the expected shape. Every missing, unexpected or
wrong-shaped tensor is reported in one error.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import pathlib
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from nuggets_jax import sharding
from nuggets_jax.errors import UserError
from nuggets_jax.models.config import ModelConfig
from nuggets_jax.models.llama import Llama


class CheckpointError(UserError):
    """A checkpoint that does not match its config.json."""


# HF key -> (our parameter path, transpose?). "{i}" is the layer index of stacked parameters.
_KEY_TABLE: list[tuple[str, tuple[str, ...], bool]] = [
    (r"model\.embed_tokens\.weight", ("embed",), False),
    (r"model\.norm\.weight", ("final_norm",), False),
    (r"lm_head\.weight", ("lm_head",), True),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", ("layers", "input_norm"), False),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", ("layers", "post_attention_norm"), False),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", ("layers", "q_proj"), True),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", ("layers", "k_proj"), True),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", ("layers", "v_proj"), True),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", ("layers", "o_proj"), True),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", ("layers", "q_bias"), False),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", ("layers", "k_bias"), False),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", ("layers", "v_bias"), False),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias", ("layers", "o_bias"), False),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", ("layers", "gate_proj"), True),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", ("layers", "up_proj"), True),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", ("layers", "down_proj"), True),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.bias", ("layers", "gate_bias"), False),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.bias", ("layers", "up_bias"), False),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.bias", ("layers", "down_bias"), False),
]
# Buffers some checkpoints carry that hold nothing we load.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) from a .safetensors file, memory-mapped (bf16 via ml_dtypes)."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        n = int.from_bytes(buf[:8], "little")
        header = json.loads(buf[8 : 8 + n])
    except (ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}).") from None
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        yield (
            name,
            np.frombuffer(
                buf, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize, offset=base + start
            ).reshape(info["shape"]),
        )


def checkpoint_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a HF model directory (sharded via the index, or single)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that are not there: {', '.join(missing)}.")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if found:
        return [model_dir / f for f in found]
    bins = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = f" It has PyTorch .bin weights ({', '.join(bins[:3])}); convert them to safetensors first." if bins else ""
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json.{hint}")


def _match(name: str) -> tuple[tuple[str, ...], int | None, bool] | None:
    for pattern, path, transpose in _KEY_TABLE:
        m = re.fullmatch(pattern, name)
        if m:
            return path, (int(m.group(1)) if m.groups() else None), transpose
    return None


def load_params(
    model_dir: str | pathlib.Path,
    config: ModelConfig | None = None,
    dtype=jnp.float32,
    mesh=None,
    replicate_kv: bool = True,
) -> Llama:
    """Builds a `Llama` in `dtype` from a HF model directory, strictly.

    The safetensors files are memory-mapped and every tensor is checked against config.json before
    anything is read. With a `mesh` each parameter is built straight into its layout of the
    sharding table (`sharding.ShardPlan`) by `jax.make_array_from_callback`: every process reads
    only the slices its own devices hold, nothing is compared across processes and no process
    needs the whole model in host memory. With `replicate_kv` (for scoring: the copies of a KV
    head would drift apart in training) each KV head is repeated `sharding.kv_replicas` times when
    that lets the attention split over the mesh's `model` axis; the model computes the same function.

    Raises:
      CheckpointError: listing every missing, unexpected and wrong-shaped tensor at once.
    """
    model_dir = pathlib.Path(model_dir)
    config = config or ModelConfig.from_file(model_dir / "config.json")
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = {path: v.shape for path, v in nnx.to_flat_state(state)}
    sources = _index_checkpoint(model_dir, config, expected)
    replicas = sharding.kv_replicas(config, sharding.model_size(mesh)) if mesh is not None and replicate_kv else 1
    if replicas > 1:
        config = sharding.scoring_config(config, sharding.model_size(mesh))
        abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        expected = {path: v.shape for path, v in nnx.to_flat_state(state)}
        for name in ("k_proj", "v_proj", "k_bias", "v_bias"):
            if ("layers", name) in sources:
                sources["layers", name] = [(a, t, replicas, config.head_dim) for a, t in sources["layers", name]]
    targets = {}
    if mesh is not None:
        plan = sharding.ShardPlan.of(config, sharding.model_size(mesh))
        targets = dict(nnx.to_flat_state(sharding.param_shardings(mesh, plan, state)))
    nested: dict = {}
    for path, shape in expected.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _build(sources[path], shape, dtype, _value(targets.get(path)))
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


def _value(x):
    return x.get_value() if hasattr(x, "get_value") else x


# One parameter's source: (mapped array, transpose?[, KV replicas, head dim]) for a whole tensor,
# or one per layer.
Source = tuple


def _index_checkpoint(
    model_dir: pathlib.Path, config: ModelConfig, expected: dict[tuple[str, ...], tuple[int, ...]]
) -> dict[tuple[str, ...], Source | list[Source]]:
    """Maps every parameter to its memory-mapped tensor(s); reads no tensor data."""
    sources: dict[tuple[str, ...], Source | list[Source | None]] = {}
    unexpected, wrong_shape = [], []
    misshapen: set[tuple[tuple[str, ...], int | None]] = set()  # reported once, not again as missing
    for file in checkpoint_files(model_dir):
        for name, array in read_safetensors(file):
            hit = _match(name)
            if hit is None or hit[0] not in expected:
                if _IGNORED.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                unexpected.append(f"{name} {list(array.shape)}")
                continue
            path, layer, transpose = hit
            want = expected[path][1:] if layer is not None else expected[path]
            got = array.T.shape if transpose else array.shape
            if layer is not None and layer >= config.num_layers:
                unexpected.append(f"{name} (layer {layer} >= num_hidden_layers={config.num_layers})")
                continue
            if tuple(got) != tuple(want):
                hf_want = tuple(reversed(want)) if transpose else tuple(want)
                wrong_shape.append(f"{name}: {list(array.shape)}, expected {list(hf_want)}")
                misshapen.add((path, layer))
                continue
            if layer is None:
                sources[path] = (array, transpose)
            else:
                sources.setdefault(path, [None] * config.num_layers)[layer] = (array, transpose)
    missing = []
    for path in expected:
        stacked = path[0] == "layers"
        got = sources.get(path, [None] * config.num_layers if stacked else None)
        for i, src in enumerate(got if stacked else [got]):
            layer = i if stacked else None
            if src is None and (path, layer) not in misshapen:
                missing.append(_hf_name(path, layer))
    if missing or unexpected or wrong_shape:
        parts = [
            f"{model_dir}: checkpoint does not match config.json ({config.model_type}, "
            f"{config.num_layers} layers, hidden {config.hidden_size})."
        ]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        raise CheckpointError("\n".join(parts))
    return sources


def _read(source: Source | list[Source], index: tuple[slice, ...], dtype) -> np.ndarray:
    """The `index` block of a parameter in `dtype`, reading only those bytes of the mapped files."""
    if isinstance(source, tuple):
        array, transpose = source
        return np.asarray((array.T if transpose else array)[index]).astype(dtype)
    layers = range(len(source))[index[0]]
    out = [np.asarray(_oriented(source[i])[index[1:]]).astype(dtype) for i in layers]
    return np.stack(out) if out else np.empty((0,), dtype)


def _oriented(source) -> np.ndarray:
    """A layer's tensor in our layout ([in, out]); KV heads repeated in place when asked (each
    head's copies side by side, so query head h still reads KV head h // groups)."""
    array, transpose, *repeat = source
    array = array.T if transpose else array
    if not repeat:
        return array
    replicas, head_dim = repeat
    heads = array.shape[-1] // head_dim
    split = array.reshape(*array.shape[:-1], heads, head_dim)
    return np.repeat(split, replicas, axis=-2).reshape(*array.shape[:-1], heads * replicas * head_dim)


def _build(source, shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(_read(source, tuple(slice(None) for _ in shape), dtype))
    return jax.make_array_from_callback(shape, sharding, lambda index: _read(source, index, dtype))


def _hf_name(path: tuple[str, ...], layer: int | None) -> str:
    for pattern, p, _ in _KEY_TABLE:
        if p == path:
            name = pattern.replace("\\.", ".")
            return name.replace("(\\d+)", "*" if layer is None else str(layer))
    return "/".join(path)


def save_params(model: Llama, model_dir: str | pathlib.Path, hf_config: dict, write: bool = True) -> None:
    """Writes `model` as a HF directory (config.json + model.safetensors), e.g. after fine-tuning.

    Streams one tensor (one layer of a stacked parameter) at a time, so no process holds more than
    one of them on the host: with parameters sharded over several processes every process must call
    this (each tensor is gathered in turn) and only the one with `write` writes the file.
    """
    model_dir = pathlib.Path(model_dir)
    flat = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    entries = []  # (HF name, parameter path, layer or None, transpose)
    for pattern, path, transpose in _KEY_TABLE:
        if path in flat:
            name = pattern.replace("\\.", ".")
            if path[0] == "layers":
                entries += [(name.replace("(\\d+)", str(i)), path, i, transpose) for i in range(flat[path].shape[0])]
            else:
                entries.append((name, path, None, transpose))
    entries.sort()
    header, offset = {}, 0
    for name, path, layer, transpose in entries:
        shape = list(flat[path].shape[1:] if layer is not None else flat[path].shape)
        shape = shape[::-1] if transpose else shape
        dtype = _export_dtype(flat[path].dtype)
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = model_dir / "model.safetensors.tmp"
    if write:
        model_dir.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") if write else contextlib.nullcontext() as out:
        if out is not None:
            out.write(len(blob).to_bytes(8, "little") + blob)
        for _, path, layer, transpose in entries:
            block = _host_copy(flat[path], layer)  # every process takes part in the gather
            if out is not None:
                block = block.T if transpose else block
                out.write(np.ascontiguousarray(block.astype(_export_dtype(block.dtype))).tobytes())
    if write:
        tmp.replace(model_dir / "model.safetensors")
        (model_dir / "config.json").write_text(json.dumps(hf_config, indent=2))


_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def _export_dtype(dtype) -> np.dtype:
    # Exported weights are float32 (exact for bf16/f16 weights, and what every reader takes).
    return np.dtype(np.float32) if np.dtype(dtype).kind == "f" or dtype == ml_dtypes.bfloat16 else np.dtype(dtype)


def _host_copy(array, layer: int | None) -> np.ndarray:
    """One parameter (or one layer of a stacked one) on the host, gathered from every device that holds a part."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return np.asarray(jax.device_get(array if layer is None else array[layer]))
    replicated = jax.sharding.NamedSharding(array.sharding.mesh, jax.sharding.PartitionSpec())
    part = jax.jit(lambda a: a if layer is None else a[layer], out_shardings=replicated)(array)
    return np.asarray(part.addressable_data(0))
