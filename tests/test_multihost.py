"""Two processes on localhost (CPU collectives) give the same scores.npz as one process.

Also with the parameters split over `model` (two processes x 4 devices, mesh data=2 x model=4),
with every cross-process collective counted (tests/multihost_driver.py): loading the model and
building the engine move no parameter-sized data between processes, and the merge moves each row once.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from nuggets_jax.synthetic import generate as synthetic
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mh_inputs")
    (d / "pool.json").write_text(json.dumps(synthetic.generate_pool(37, seed=8)))
    (d / "tasks.json").write_text(json.dumps(synthetic.generate_tasks(20, seed=9)))
    return d / "pool.json", d / "tasks.json"


DRIVER = REPO / "tests" / "multihost_driver.py"


def args(model_dir, inputs, workdir, extra=(), driver=False):
    """The scoring command; `driver`: through tests/multihost_driver.py (collectives counted)."""
    entry = [str(DRIVER)] if driver else ["-m", "experiments.score"]
    return [
        sys.executable,
        *entry,
        "--config=configs/score.py",
        f"--config.model.path={model_dir}",
        f"--config.data.pool={inputs[0]}",
        f"--config.data.tasks={inputs[1]}",
        "--config.scoring.chunk_candidates=4",
        # One candidate per device: the traffic bounds count rows padded to one block per process.
        "--config.scoring.candidates_per_device=1",
        "--config.progress=False",
        "--config.report=False",
        f"--workdir={workdir}",
        *extra,
    ]


def start_pair(model_dir, inputs, workdir, devices=2, extra=(), driver=False):
    port = free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONPATH": str(REPO)}
        cmd = args(model_dir, inputs, workdir, extra, driver) + [
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


def finish(procs, timeout=600):
    """Waits for every process (killing them all if one overruns); returns their output."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        raise AssertionError(
            "the processes did not finish in time:\n"
            + "\n".join(f"--- process {i} ---\n{log[-3000:]}" for i, log in enumerate(logs))
        ) from None
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}\n--- the other ---\n{outs[1 - i][-1500:]}"
    return outs


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, inputs):
    workdir = tmp_path_factory.mktemp("single")
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        args(tiny_model_dir, inputs, workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_two_processes_equal_one(tmp_path, tiny_model_dir, inputs, single):
    finish(start_pair(tiny_model_dir, inputs, tmp_path / "w"))
    got, want = load(tmp_path / "w" / "scores.npz"), load(single / "scores.npz")
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # Each process saved only its own candidates; together they cover the pool once.
    seen = []
    for proc_dir in sorted((tmp_path / "w" / "chunks").glob("process_*")):
        seen += [int(i) for f in proc_dir.glob("one-*.npz") for i in np.load(f)["candidates"]]
    assert sorted(seen) == list(range(37))
    assert (tmp_path / "w" / "ranking.jsonl").read_text() == (single / "ranking.jsonl").read_text()


def test_two_processes_resume_after_kill(tmp_path, tiny_model_dir, inputs, single):
    workdir = tmp_path / "w"
    procs = start_pair(tiny_model_dir, inputs, workdir)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if len(list((workdir / "chunks").glob("process_*/one-*.npz"))) >= 3:
            break
        time.sleep(0.005)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (workdir / "scores.npz").exists(), "the run finished before it could be killed"
    outs = finish(start_pair(tiny_model_dir, inputs, workdir))
    assert any("resuming:" in out for out in outs)
    got, want = load(workdir / "scores.npz"), load(single / "scores.npz")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# -- model parallel across processes: mesh (data=2, model=4) over two processes x 4 devices ---------
# One prefix bucket and one task-window width: two compiled programs instead of eight, the same
# in both runs compared.
SMALL_ENGINE = ["--config.scoring.max_prefix_buckets=1", "--config.scoring.max_window_widths=1"]
POOL, TASKS = 15, 6  # an odd pool: one process scores one candidate more than the other


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp_inputs")
    (d / "pool.json").write_text(json.dumps(synthetic.generate_pool(POOL, seed=8)))
    (d / "tasks.json").write_text(json.dumps(synthetic.generate_tasks(TASKS, seed=9)))
    return d / "pool.json", d / "tasks.json"


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, tiny_model_dir, small_inputs):
    """One process, one device, the whole model on it."""
    workdir = tmp_path_factory.mktemp("one_device")
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        args(tiny_model_dir, small_inputs, workdir, SMALL_ENGINE),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def model_parallel_pair(tmp_path_factory, tiny_model_dir, small_inputs):
    """Two processes x 4 devices at mesh.model=4, through the counting driver: (workdir, outputs)."""
    workdir = tmp_path_factory.mktemp("model_parallel") / "w"
    procs = start_pair(
        tiny_model_dir, small_inputs, workdir, devices=4, extra=[*SMALL_ENGINE, "--config.mesh.model=4"], driver=True
    )
    return workdir, finish(procs, timeout=300)


def ranking(workdir):
    return [json.loads(line) for line in (workdir / "ranking.jsonl").read_text().splitlines()]


def test_model_parallel_two_processes_equal_one_device(model_parallel_pair, one_device):
    workdir, outs = model_parallel_pair
    run = json.loads((workdir / "run.json").read_text())
    assert run["mesh"] == {"data": 2, "model": 4}
    # The tiny model's MLP width (64) and vocabulary (320) divide by 4; its 2 KV heads do not, so they are copied.
    for out in outs:
        # 2 KV heads are replicated to 4 so the attention splits too (sharding.kv_replicas).
        assert "KV heads replicated 2 -> 4" in out
        assert "attention split; mlp split; vocabulary split" in out
    single_run = json.loads((one_device / "run.json").read_text())
    assert run["param_bytes_per_device"] < single_run["param_bytes_per_device"]

    got, want = load(workdir / "scores.npz"), load(one_device / "scores.npz")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape, key
        if want[key].dtype.kind == "f":
            # The model-parallel all-reduces sum the partial products in another order.
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    got_rank, want_rank = ranking(workdir), ranking(one_device)
    assert [(r["id"], r["rank"]) for r in got_rank] == [(r["id"], r["rank"]) for r in want_rank]
    for metric in ("win_rate", "token_acc_gain"):  # counts of comparisons and of integers
        assert [r[metric] for r in got_rank] == [r[metric] for r in want_rank], metric
    np.testing.assert_allclose(
        [r["mean_logp_gain"] for r in got_rank], [r["mean_logp_gain"] for r in want_rank], rtol=1e-5, atol=1e-5
    )
    # A difference of two perplexities (exp of the per-token mean) cancels digits: 1e-5 in the
    # log-probabilities is a few 1e-5 here.
    np.testing.assert_allclose(
        [r["mean_ppl_drop"] for r in got_rank], [r["mean_ppl_drop"] for r in want_rank], rtol=1e-4, atol=1e-4
    )
    golden = [r["id"] for r in json.loads((workdir / "golden.json").read_text())]
    assert golden and golden == [r["id"] for r in json.loads((one_device / "golden.json").read_text())]

    # Each process saved only the candidates of its own `data` row; together they cover the pool once.
    seen = {}
    for proc_dir in sorted((workdir / "chunks").glob("process_*")):
        seen[proc_dir.name] = [int(i) for f in proc_dir.glob("one-*.npz") for i in np.load(f)["candidates"]]
    assert len(seen) == 2 and all(seen.values())
    assert sorted(sum(seen.values(), [])) == list(range(POOL))


def test_model_parallel_host_traffic(model_parallel_pair):
    workdir, _ = model_parallel_pair
    traffic = json.loads((workdir / "run.json").read_text())["host_traffic"]
    # Loading straight into the sharded layout and building the engine exchange no parameters.
    assert traffic["load_and_build"] < 1024
    # The merge moves each [C, T] row once: logp float32 + correct int32 per task and a row index
    # (jax without x64 carries the int64 indices as int32, 8 bytes is an upper bound), padded to the
    # busiest process (+1 row of slack), as received by this process from both.
    processes = 2
    max_rows = math.ceil(POOL / processes) + 1
    assert POOL * TASKS * (4 + 4) <= traffic["merge_rows"] <= processes * max_rows * (TASKS * 8 + 8)

    # Every collective that went through jax's multihost_utils, counted by the driver in each process.
    counters = [json.loads((workdir / f"traffic_{i}.json").read_text()) for i in range(processes)]
    for i, counted in enumerate(counters):
        before = counted["before_scoring"]
        assert before is not None, f"process {i} never reached the zero-shot pass"
        # No process_allgather / assert_equal / broadcast of parameter-sized data (jax.device_put of
        # host data onto a sharding across processes would call assert_equal) before scoring.
        assert before["bytes"] < 1024 and before["largest"] < 1024, (i, before)
        # Every byte that crossed processes is one the library counted in host_traffic (no hidden
        # collectives); both processes run the same collectives.
        assert counted["total"]["bytes"] == sum(traffic.values()), (i, counted["total"], traffic)
        assert counted["total"]["calls"].get("process_allgather", 0) > 0
