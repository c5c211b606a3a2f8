"""Two processes on localhost (CPU collectives) give the same scores.npz as one process."""

import json
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


def args(model_dir, inputs, workdir):
    return [
        sys.executable,
        "-m",
        "experiments.score",
        "--config=configs/score.py",
        f"--config.model.path={model_dir}",
        f"--config.data.pool={inputs[0]}",
        f"--config.data.tasks={inputs[1]}",
        "--config.scoring.chunk_candidates=4",
        "--config.progress=False",
        "--config.report=False",
        f"--workdir={workdir}",
    ]


def start_pair(model_dir, inputs, workdir):
    port = free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "PYTHONPATH": str(REPO)}
        cmd = args(model_dir, inputs, workdir) + [
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


def finish(procs):
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
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
