"""Fine-tuning checkpoints: `ckpt_<step>/` directories written atomically, found and read back.

A checkpoint is in HF layout (config.json, model.safetensors and the tokenizer, so
`load_model`/`load_params` read it back) plus optimizer.npz (the optimizer state's leaves in
flattening order) and trainer_state.json (step, the run's fingerprint, the names of the
optimizer leaves). It is written to a temporary sibling directory, fsynced, then renamed, so a
killed run never leaves a half-written `ckpt_<step>/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nuggets_jax import store as store_lib
from nuggets_jax.finetune.data import FinetuneError
from nuggets_jax.models import TOKENIZER_FILES
from nuggets_jax.models.config import ModelConfig
from nuggets_jax.models.params import load_params, save_params

_CHECKPOINT_PREFIX = "ckpt_"


def checkpoint_dirs(run_dir: str | pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """Complete checkpoints (trainer_state.json present) of a run directory, oldest first."""
    run_dir = pathlib.Path(run_dir)
    found = []
    for path in run_dir.glob(f"{_CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(_CHECKPOINT_PREFIX) :]
        if path.is_dir() and suffix.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(suffix), path))
    return sorted(found)


def _flatten_tree(tree) -> tuple[list[str], list[np.ndarray]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in leaves], [np.asarray(jax.device_get(x)) for _, x in leaves]


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields an empty temporary sibling of `final` to fill; then fsyncs it and renames it to `final`.

    A replaced `final` is deleted first. If the block raises, the temporary directory stays behind
    (hidden, `.<name>.tmp<pid>`); for a checkpoint, `remove_unfinished` deletes it when the run restarts.
    """
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def remove_unfinished(run_dir: pathlib.Path) -> None:
    """Deletes the temporary directories of checkpoints whose writing was killed."""
    for stale in run_dir.glob(f".{_CHECKPOINT_PREFIX}*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)


def keep_newest(run_dir: pathlib.Path, keep: int) -> None:
    """Deletes all but the newest `keep` complete checkpoints."""
    for _, old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    run_dir: pathlib.Path,
    step: int,
    graphdef,
    params,
    opt_state,
    trainer_state: dict[str, Any],
    hf_config: dict,
    tokenizer_dir: pathlib.Path | None,
    with_optimizer: bool = True,
) -> pathlib.Path:
    """Writes `ckpt_<step>/` atomically (`atomic_directory`) and returns its path.

    The optimizer state (2x the parameters) is left out of a run's last checkpoint, which is never resumed.
    """
    final = run_dir / f"{_CHECKPOINT_PREFIX}{step:06d}"
    with atomic_directory(final) as tmp:
        save_params(nnx.merge(graphdef, jax.device_get(params)), tmp, hf_config)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / name)
        state = {**trainer_state, "step": step}
        if with_optimizer:
            names, leaves = _flatten_tree(opt_state)
            store_lib.write_npz(tmp / "optimizer.npz", {f"leaf_{i:05d}": x for i, x in enumerate(leaves)})
            state["optimizer_leaves"] = names
        store_lib.atomic_write_bytes(tmp / "trainer_state.json", json.dumps(state, indent=1).encode())
    return final


def load_checkpoint(path: pathlib.Path, config: ModelConfig, opt_template) -> tuple[Any, Any, dict]:
    """Parameters (float32), optimizer state (None if the checkpoint has none) and trainer state of `ckpt_<step>/`.

    Raises:
      FinetuneError: the optimizer state does not match this run's optimizer.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    params = nnx.split(load_params(path, config, dtype=jnp.float32))[1]
    if "optimizer_leaves" not in state:
        return params, None, state
    names, template = _flatten_tree(opt_template)
    if names != state["optimizer_leaves"]:
        raise FinetuneError(f"{path}: optimizer state of a different optimizer; use another run directory.")
    with np.load(path / "optimizer.npz", allow_pickle=False) as z:
        leaves = [z[f"leaf_{i:05d}"] for i in range(len(names))]
    for name, got, want in zip(names, leaves, template, strict=True):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise FinetuneError(
                f"{path}/optimizer.npz: {name} is {got.dtype}{got.shape}, expected {want.dtype}{want.shape}."
            )
    treedef = jax.tree_util.tree_structure(opt_template)
    return params, jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves]), state
