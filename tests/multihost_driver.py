"""`python -m experiments.score`, with every cross-process collective of jax's `multihost_utils` counted.

  python tests/multihost_driver.py --config=configs/score.py --workdir=DIR [--config.x=y ...]

Wraps `multihost_utils.process_allgather`, `assert_equal` and `broadcast_one_to_all` (the library's
gathers and jax's own checks, e.g. `jax.device_put` of host data onto a sharding that spans
processes, all go through them) with call and byte counters, snapshots the counters when the
scoring job reaches `nuggets_jax.scoring.job.zero_shot` (the model is loaded and the engine built
by then), and at exit writes WORKDIR/traffic_{process}.json:

  {"before_scoring": COUNTS, "total": COUNTS}, COUNTS = {"bytes": B, "largest": B, "calls": {name: n},
  "bytes_by_call": {name: B}}

`bytes` counts what the outermost wrapped call delivered to this process (a nested call, like the
`process_allgather` inside `assert_equal`, adds to its own name's calls and bytes_by_call only);
`largest` is the biggest single outermost call.
"""

import collections
import copy
import functools
import json
import pathlib
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

REPO = pathlib.Path(__file__).resolve().parents[1]

_COUNTS = {"bytes": 0, "largest": 0, "calls": collections.Counter(), "bytes_by_call": collections.Counter()}
_SNAPSHOTS: dict[str, dict] = {}
_depth = 0


def _tree_bytes(tree) -> int:
    # A jax.Array's nbytes is its global size; python scalars and lists go through numpy.
    return sum(int(x.nbytes) if hasattr(x, "nbytes") else np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def _counted(name: str, fn, received):
    """fn with its calls counted; `received(args, kwargs, out)` = bytes it delivered to this process."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _depth
        _depth += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            _depth -= 1
        n = received(args, kwargs, out)
        _COUNTS["calls"][name] += 1
        _COUNTS["bytes_by_call"][name] += n
        if _depth == 0:
            _COUNTS["bytes"] += n
            _COUNTS["largest"] = max(_COUNTS["largest"], n)
        return out

    return wrapper


def _snapshot() -> dict:
    return copy.deepcopy({k: dict(v) if isinstance(v, collections.Counter) else v for k, v in _COUNTS.items()})


def install() -> None:
    """Replaces the three collectives on the module (callers look them up there at call time)."""
    multihost_utils.process_allgather = _counted(
        "process_allgather", multihost_utils.process_allgather, lambda a, k, out: _tree_bytes(out)
    )
    multihost_utils.broadcast_one_to_all = _counted(
        "broadcast_one_to_all", multihost_utils.broadcast_one_to_all, lambda a, k, out: _tree_bytes(out)
    )
    if hasattr(multihost_utils, "assert_equal"):
        # Returns nothing; it gathers its argument from every process.
        multihost_utils.assert_equal = _counted(
            "assert_equal",
            multihost_utils.assert_equal,
            lambda a, k, out: _tree_bytes(a[0] if a else k["in_tree"]) * jax.process_count(),
        )

    from nuggets_jax.scoring import job

    zero_shot = job.zero_shot

    @functools.wraps(zero_shot)
    def first_scoring_call(*args, **kwargs):
        _SNAPSHOTS.setdefault("before_scoring", _snapshot())
        return zero_shot(*args, **kwargs)

    job.zero_shot = first_scoring_call


def _flag(name: str, default: str) -> str:
    for arg in sys.argv[1:]:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return default


def write(workdir: pathlib.Path, process: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    out = {"before_scoring": _SNAPSHOTS.get("before_scoring"), "total": _snapshot()}
    (workdir / f"traffic_{process}.json").write_text(json.dumps(out, indent=2))


def main() -> None:
    sys.path.insert(0, str(REPO))
    install()
    from experiments import cli, score

    try:
        cli.run(score.main)
    finally:
        write(pathlib.Path(_flag("workdir", ".")), int(_flag("config.distributed.process_id", "0")))


if __name__ == "__main__":
    main()
