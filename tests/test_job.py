"""The scoring job end to end on a tiny model: workdir contents, resume after SIGKILL, fingerprints, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nuggets_jax import metrics
from nuggets_jax.synthetic import generate as synthetic
from tests.conftest import REPO


def score_cmd(model_dir, pool, tasks, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.score",
        "--config=configs/score.py",
        f"--config.model.path={model_dir}",
        f"--config.data.pool={pool}",
        f"--config.data.tasks={tasks}",
        "--config.scoring.chunk_candidates=2",
        "--config.scoring.candidates_per_device=1",  # two candidates a chunk (2 devices): many chunks to kill between
        "--config.progress=False",
        f"--workdir={workdir}",
        *extra,
    ]


def env():
    return {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(REPO)}


def run(cmd, check=True):
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "pool.json").write_text(json.dumps(synthetic.generate_pool(60, seed=3)))
    (d / "tasks.json").write_text(json.dumps(synthetic.generate_tasks(40, seed=4)))
    return d / "pool.json", d / "tasks.json"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir, inputs):
    workdir = tmp_path_factory.mktemp("reference")
    run(score_cmd(tiny_model_dir, *inputs, workdir))
    return workdir


def test_workdir_contents(reference_run, inputs):
    w = reference_run
    for name in ("config.json", "scores.npz", "ranking.jsonl", "golden.json", "report.md", "run.json"):
        assert (w / name).is_file(), name
    pool = json.loads(inputs[0].read_text())
    with np.load(w / "scores.npz") as z:
        scores = {k: z[k] for k in z.files}
    c, t = len(pool), 40
    assert scores["one_logp"].shape == (c, t) and scores["one_correct"].shape == (c, t)
    assert scores["zero_logp"].shape == (t,) and scores["n_tokens"].shape == (t,)
    assert list(scores["candidate_ids"]) == [str(r["id"]) for r in pool]
    assert np.isfinite(scores["one_logp"]).all() and (scores["one_logp"] < 0).all()
    ranking = [json.loads(line) for line in (w / "ranking.jsonl").read_text().splitlines()]
    win = metrics.compute_metric("win_rate", scores)
    # Rank order: win rate descending, ties by position in the pool.
    position = {r["id"]: i for i, r in enumerate(pool)}
    keys = [(-win[position[r["id"]]], position[r["id"]]) for r in ranking]
    assert keys == sorted(keys) and [r["rank"] for r in ranking] == list(range(1, c + 1))
    assert all("corruption" in r for r in ranking)
    golden = json.loads((w / "golden.json").read_text())
    assert len(golden) == int(np.ceil(0.1 * c))
    assert [g["id"] for g in golden] == [r["id"] for r in ranking[: len(golden)]]
    assert all(g["corruption"] == next(p for p in pool if p["id"] == g["id"])["corruption"] for g in golden)
    run_info = json.loads((w / "run.json").read_text())
    for key in ("tokens_per_s", "pairs_per_s", "flops_per_s", "wall_s"):
        assert run_info[key] > 0
    assert run_info["compiles_after_warmup"] == 0
    config = json.loads((w / "config.json").read_text())
    assert config["data"]["pool"] == str(inputs[0])


def test_report_names_the_default_selection_rule(reference_run):
    """configs/score.py sets no select.* field: the golden set is the top 10%, and report.md says so."""
    assert json.loads((reference_run / "run.json").read_text())["selection"] == {"top_fraction": 0.1}
    text = (reference_run / "report.md").read_text(encoding="utf-8")
    assert "records (top_fraction = 0.1)" in text and "rule n/a" not in text


@pytest.mark.parametrize("kill_after_chunks", [0, 1, 12])
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny_model_dir, inputs, reference_run, kill_after_chunks):
    workdir = tmp_path / "w"
    chunk_dir = workdir / "chunks" / "process_000"
    proc = subprocess.Popen(
        score_cmd(tiny_model_dir, *inputs, workdir),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (
            chunk_dir.is_dir()
            and len(list(chunk_dir.glob("one-*.npz"))) >= kill_after_chunks
            and (kill_after_chunks or (chunk_dir / "zero.npz").is_file())
        ):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "scores.npz").exists(), "the run finished before it could be killed"
    done = len(list(chunk_dir.glob("one-*.npz")))
    assert done >= kill_after_chunks
    resumed = run(score_cmd(tiny_model_dir, *inputs, workdir))
    if done:
        assert f"resuming: {2 * done} of 60 candidates already scored" in resumed.stderr
    for name in ("scores.npz", "ranking.jsonl", "golden.json"):
        assert (workdir / name).read_bytes() == (reference_run / name).read_bytes(), name
    info = json.loads((workdir / "run.json").read_text())
    assert info["resumed_candidates"] == 2 * done


def test_changed_inputs_are_refused_unless_fresh(tmp_path, tiny_model_dir, inputs):
    pool = tmp_path / "pool.json"
    records = json.loads(inputs[0].read_text())[:6]
    pool.write_text(json.dumps(records))
    workdir = tmp_path / "w"
    run(score_cmd(tiny_model_dir, pool, inputs[1], workdir))
    records[2]["output"] = "Something else entirely."
    pool.write_text(json.dumps(records))
    refused = run(score_cmd(tiny_model_dir, pool, inputs[1], workdir), check=False)
    assert refused.returncode == 2
    assert "holds scores of a different run" in refused.stderr and "changed: pool" in refused.stderr
    assert "Traceback" not in refused.stderr
    run(score_cmd(tiny_model_dir, pool, inputs[1], workdir, "--config.fresh=True"))
    ranking = [json.loads(line) for line in (workdir / "ranking.jsonl").read_text().splitlines()]
    assert len(ranking) == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--config.metric=accuracy"], "unknown metric 'accuracy'; choose one of: win_rate"),
        (["--config.preset=fast"], "unknown preset 'fast'; choose one of: default, original"),
        (["--config.data.nope=1"], "unknown config field 'nope' (--config.data.nope)"),
        (["--config.select.top_n=5", "--config.select.threshold=0.5"], "set only one of select.top_n"),
        (["--config.data.task_set_limit=3"], "40 tasks is more than data.task_set_limit=3"),
        (["--config.model.path=/no/such/model"], "/no/such/model: no such file or directory"),
    ],
)
def test_bad_config_gives_one_clear_line(tmp_path, tiny_model_dir, inputs, extra, message):
    proc = run(score_cmd(tiny_model_dir, *inputs, tmp_path / "w", *extra), check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("config_flag", "message"),
    [
        ("--config=configs/score.py:adaptive=quick", "unknown adaptive='quick'; use adaptive=safe or adaptive=fast"),
        ("--config=configs/score.py:runlokal", "unknown config argument 'runlokal'; this config takes:"),
        ("--config=configs/no_such.py", "cannot load the config file configs/no_such.py"),
    ],
)
def test_bad_config_file_argument_gives_one_clear_line(tmp_path, config_flag, message):
    proc = run([sys.executable, "-m", "experiments.score", config_flag, f"--workdir={tmp_path / 'w'}"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


def test_workdir_that_cannot_be_created(tmp_path, tiny_model_dir, inputs):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run(score_cmd(tiny_model_dir, *inputs, blocker / "w"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "cannot create the workdir" in proc.stderr and "choose a writable --workdir" in proc.stderr


def test_disk_full_stops_cleanly_and_resumes(tmp_path, tiny_model_dir, inputs, monkeypatch):
    """ENOSPC while saving a chunk: a clear StoreError, no partial chunk, and a later run completes exactly."""
    import errno

    from configs import score as score_config
    from nuggets_jax import store
    from nuggets_jax.scoring import job as job

    config = score_config.get_config()
    config.model.path = str(tiny_model_dir)
    config.data.pool, config.data.tasks = str(inputs[0]), str(inputs[1])
    config.scoring.chunk_candidates = 2
    config.progress = False
    workdir = tmp_path / "w"
    real_fsync, calls = os.fsync, []

    def fsync_until_full(fd):
        calls.append(fd)
        if len(calls) > 14:  # config/fingerprint/zero-shot first (file + directory each), then chunks
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync_until_full)
    with pytest.raises(store.StoreError, match="the disk is full"):
        job.run_score(config, workdir, log=lambda m: None)
    monkeypatch.setattr(store.os, "fsync", real_fsync)
    chunk_dir = workdir / "chunks" / "process_000"
    assert not list(chunk_dir.glob(".*tmp*"))
    saved = sum(len(np.load(f)["candidates"]) for f in chunk_dir.glob("one-*.npz"))
    assert 1 <= saved < 60
    messages = []
    job.run_score(config, workdir, log=messages.append)
    assert any(f"resuming: {saved} of 60" in m for m in messages), (saved, messages)
    # This process fakes 8 devices (the subprocess runs use 1): compare with an uninterrupted run here.
    uninterrupted = tmp_path / "u"
    job.run_score(config, uninterrupted, log=lambda m: None)
    for name in ("scores.npz", "ranking.jsonl", "golden.json"):
        assert (workdir / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_cpu_devices_auto_is_one_per_core_unless_set(monkeypatch):
    from configs import score as score_config
    from nuggets_jax.scoring import job as job_lib

    config = score_config.get_config()
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    count, why = job_lib.cpu_devices(config)
    assert count == len(os.sched_getaffinity(0)) and "auto" in why  # the default model fits many copies
    config.mesh.cpu_devices = 1
    assert job_lib.cpu_devices(config)[0] == 1
    config.mesh.cpu_devices = 0
    config.distributed.enabled = True
    assert job_lib.cpu_devices(config)[0] == 1
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "3")
    assert job_lib.cpu_devices(config) == (3, "JAX_NUM_CPU_DEVICES=3")


def test_cpu_devices_auto_fits_the_parameter_copies_in_half_the_host(monkeypatch):
    import jax.numpy as jnp

    from configs import score as score_config
    from nuggets_jax import models, sharding
    from nuggets_jax.scoring import job as job_lib
    from nuggets_jax.scoring import memory

    config = score_config.get_config()
    config.mesh.cpu_devices = 0
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    model_config = models.ModelConfig.from_file(models.resolve_model_dir("default") / "config.json")
    copy = memory.param_bytes(model_config, jnp.float32, 1)  # what one device holds
    page = 4096
    host_pages = int(7 * copy) // page + 1  # room for 3 copies in half of it, not 4
    monkeypatch.setattr(sharding, "usable_cores", lambda: 8)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PHYS_PAGES": host_pages, "SC_PAGE_SIZE": page}[name])
    count, why = job_lib.cpu_devices(config)
    assert count == 3 and f"{copy / 2**30:.1f} GiB copy" in why
    config.model.dtype = "bfloat16"  # half the bytes: 7 copies fit
    assert job_lib.cpu_devices(config)[0] == 7


def test_diversity_aware_golden_set_comes_from_the_shortlist(tmp_path, tiny_model_dir, inputs):
    # metric=length needs no task set, so the run is quick; the rule is the same for every metric.
    common = ("--config.metric=length", "--config.select.top_n=4", "--config.select.diversity_shortlist=3")
    plain, diverse = tmp_path / "plain", tmp_path / "diverse"
    run(score_cmd(tiny_model_dir, *inputs, plain, *common))
    run(score_cmd(tiny_model_dir, *inputs, diverse, *common, "--config.select.diversity=1.0"))
    ranking = [json.loads(line) for line in (diverse / "ranking.jsonl").read_text().splitlines()]
    assert ranking == [json.loads(line) for line in (plain / "ranking.jsonl").read_text().splitlines()]
    ranks = lambda w: [g["nuggets"]["rank"] for g in json.loads((w / "golden.json").read_text())]  # noqa: E731
    assert ranks(plain) == [1, 2, 3, 4]
    picked = ranks(diverse)
    assert picked[0] == 1 and len(set(picked)) == 4 and max(picked) <= 12  # from the best 3 x 4
    run_json = json.loads((diverse / "run.json").read_text())
    assert run_json["diversity"] == {"trade_off": 1.0, "method": "k_center", "shortlist": 3.0}
    assert run_json["compiles_after_warmup"] == 0 and "diversity" not in json.loads((plain / "run.json").read_text())
    assert "diversity 1 (k_center over the best 3x)" in (diverse / "report.md").read_text()


def test_skip_empty_leaves_out_empty_responses_without_losing_the_run(tmp_path, tiny_model_dir, inputs):
    pool = json.loads(inputs[0].read_text())[:12]
    pool[3]["output"] = "  "
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(pool))
    refused = run(score_cmd(tiny_model_dir, path, inputs[1], tmp_path / "w", "--config.metric=length"), check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert f'{path}[3]: field "output" is empty' in refused.stderr and "data.skip_empty=True" in refused.stderr
    flags = ("--config.metric=length", "--config.data.skip_empty=True")
    kept = run(score_cmd(tiny_model_dir, path, inputs[1], tmp_path / "w", *flags))
    said = kept.stdout + kept.stderr
    assert f"left out 1 record(s) with an empty response (data.skip_empty), first {path}[3]" in said
    ids = [json.loads(line)["id"] for line in (tmp_path / "w" / "ranking.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(str(r.get("id", i)) for i, r in enumerate(pool) if i != 3)
    assert json.loads((tmp_path / "w" / "fingerprint.json").read_text())["skip_empty"] is True
