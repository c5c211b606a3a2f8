"""Fine-tuning checkpoints: `ckpt_<step>/` directories written atomically, found and read back.

A checkpoint is in HF layout (config.json, model.safetensors and the tokenizer, so
`load_model`/`load_params` read it back), plus, to resume from, `train_state/`: the float32
parameters and the optimizer state as an orbax-checkpoint of sharded arrays (every process writes
only its own shards; a resumed run reads them back onto its own mesh, which may differ), and
trainer_state.json (step, the run's fingerprint, the names of the state's leaves). The safetensors
file is streamed one tensor at a time (`params.save_params`), so no process gathers the whole
model. Everything is written into a temporary sibling directory, then renamed, so a killed run
never leaves a half-written `ckpt_<step>/`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
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


def _named_leaves(tree) -> dict[str, Any]:
    """{key path: leaf} of a tree (a flat dict orbax stores without knowing the tree's node types)."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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
    """Writes `ckpt_<step>/` atomically and returns its path. Every process calls it.

    The training state (2-3x the parameters) is left out of a run's last checkpoint, which is never resumed.
    """
    import orbax.checkpoint as ocp

    final = run_dir / f"{_CHECKPOINT_PREFIX}{step:06d}"
    tmp = run_dir / f".{final.name}.tmp"
    main = jax.process_index() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(f"ckpt-{step}-start")
    save_params(nnx.merge(graphdef, params), tmp, hf_config, write=main)
    state = {**trainer_state, "step": step}
    if with_optimizer:
        tree = {"params": _named_leaves(params), "opt_state": _named_leaves(opt_state)}
        with ocp.StandardCheckpointer() as saver:
            saver.save((tmp / "train_state").absolute(), tree)
            saver.wait_until_finished()
        state["state_leaves"] = {k: list(v) for k, v in tree.items()}
    if main:
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / name)
        store_lib.atomic_write_bytes(tmp / "trainer_state.json", json.dumps(state, indent=1).encode())
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    _barrier(f"ckpt-{step}-done")
    return final


def load_checkpoint(
    path: pathlib.Path, config: ModelConfig, params_template, opt_template, shardings=None
) -> tuple[Any, Any, dict]:
    """Parameters (float32), optimizer state (None if the checkpoint has none) and trainer state of `ckpt_<step>/`.

    Args:
      path: the checkpoint.
      config: the model config.
      params_template, opt_template: trees of this run's parameters and optimizer state (arrays or
        ShapeDtypeStructs), whose structure, shapes and dtypes the checkpoint must have.
      shardings: (params, opt_state) NamedShardings to restore onto (the run's mesh, any layout).
    Raises:
      FinetuneError: the state does not match this run's model or optimizer.
    """
    import orbax.checkpoint as ocp

    state = json.loads((path / "trainer_state.json").read_text())
    if "state_leaves" not in state:
        params = nnx.split(load_params(path, config, dtype=jnp.float32))[1]
        return params, None, state
    templates = {"params": params_template, "opt_state": opt_template}
    target_shardings = dict(zip(templates, shardings, strict=True)) if shardings is not None else {}
    target = {}
    for part, template in templates.items():
        names = _named_leaves(template)
        if list(names) != state["state_leaves"][part]:
            raise FinetuneError(f"{path}: {part} of a different model or optimizer; use another run directory.")
        placed = _named_leaves(target_shardings[part]) if part in target_shardings else {}
        target[part] = {
            k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed.get(k, getattr(x, "sharding", None)))
            for k, x in names.items()
        }
    with ocp.StandardCheckpointer() as reader:
        try:
            restored = reader.restore((path / "train_state").absolute(), target)
        except (ValueError, KeyError) as e:
            raise FinetuneError(f"{path}/train_state: does not match this run ({e}).") from None
    out = []
    for part, template in templates.items():
        treedef = jax.tree_util.tree_structure(template)
        out.append(jax.tree_util.tree_unflatten(treedef, [restored[part][k] for k in _named_leaves(template)]))
    return out[0], out[1], state
