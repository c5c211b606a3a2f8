"""The named workloads of `benchmarks.bench_scoring`: their inputs, the flags over them, a real run."""

import json
import os

import pytest

from benchmarks import bench_scoring, common
from nuggets_jax import data as data_lib
from nuggets_jax import synthetic


def _workloads(*argv: str) -> list[bench_scoring.Workload]:
    args, _ = bench_scoring._parse_args(list(argv))
    return bench_scoring.resolve_workloads(args)


@pytest.fixture(scope="module")
def default_tokenizer():
    """The default model's tokenizer only (no weights loaded)."""
    import transformers

    from nuggets_jax.models import resolve_model_dir

    return transformers.AutoTokenizer.from_pretrained(str(resolve_model_dir("default")))


def test_workload_values_and_flags_over_them(shared_data):
    (paper,) = _workloads()
    assert (paper.name, paper.pool, paper.tasks) == ("paper", str(common.DEFAULT_POOL), str(common.DEFAULT_TASKS))
    assert (paper.num_candidates, paper.max_task_tokens) == (8, None)
    (short,) = _workloads("--workload", "short")
    assert (short.pool, short.tasks, short.num_candidates, short.max_task_tokens) == (
        str(common.ALPACA_POOL),
        str(common.DEFAULT_TASKS),
        64,
        64,
    )
    (default,) = _workloads("--workload", "default")
    assert (default.pool, default.tasks, default.num_candidates) == (common.GENERATED, common.GENERATED, 32)
    assert [w.name for w in _workloads("--workload", "all")] == ["paper", "default", "short"]

    (short,) = _workloads("--workload", "short", "--num_candidates", "2", "--max_task_tokens", "80")
    assert (short.num_candidates, short.max_task_tokens, short.pool) == (2, 80, str(common.ALPACA_POOL))
    every = _workloads("--workload", "all", "--pool", str(common.DEFAULT_POOL), "--num_candidates", "3")
    assert {(w.pool, w.num_candidates) for w in every} == {(str(common.DEFAULT_POOL), 3)}
    mixed = _workloads("--workload", "all", "--num_candidates", "paper=2,short=5")
    assert [(w.name, w.num_candidates) for w in mixed] == [("paper", 2), ("default", 32), ("short", 5)]
    with pytest.raises(SystemExit):
        _workloads("--num_candidates", "papr=2")


def test_missing_workload_file_names_it_and_what_to_do(monkeypatch, tmp_path):
    absent = common.SHARED_DATA / "absent_folder" / "pool.json"
    monkeypatch.setitem(
        bench_scoring.WORKLOADS, "paper", bench_scoring.Workload("paper", str(absent), common.GENERATED, 8)
    )
    with pytest.raises(SystemExit) as error:
        _workloads("--workload", "paper")
    message = str(error.value)
    assert str(absent) in message and "'paper' workload's pool file" in message
    assert "SOURCES.md" in message and "--pool PATH" in message and "--workload default" in message

    with pytest.raises(SystemExit, match=r"nowhere\.json.*tasks file.*--tasks PATH"):
        _workloads("--workload", "default", "--tasks", str(tmp_path / "nowhere.json"))


def test_skip_empty_outputs_drops_only_those(tmp_path):
    path = tmp_path / "pool.json"
    objects = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "  "},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    path.write_text(json.dumps(objects))
    with pytest.raises(data_lib.DataError, match=r"pool\.json\[1\].*empty"):
        common.read_records(path, "pool")
    records, source, dropped = common.read_records(path, "pool", skip_empty_outputs=True)
    assert [r.output for r in records] == ["5", "hi"]
    assert (source, dropped) == (str(path), [f"{path}[1]"])


@pytest.mark.integration
def test_default_workload_is_the_jobs_generated_data(default_tokenizer):
    inputs = common.load_inputs(default_tokenizer, common.GENERATED, common.GENERATED, 32, seed=0)
    pool, tasks = synthetic.generate_pool(), synthetic.generate_tasks()
    fields = ("id", "instruction", "input", "output")
    assert len(inputs.candidates) == 32 and len(inputs.tasks) == len(tasks) == 16
    assert [tuple(getattr(r, f) for f in fields) for r in inputs.candidates] == [
        tuple(pool[i][f] for f in fields) for i in inputs.candidate_indices
    ]
    assert [tuple(getattr(r, f) for f in fields) for r in inputs.tasks] == [tuple(t[f] for f in fields) for t in tasks]
    assert [r.raw for r in inputs.tasks] == tasks  # every field carried, as the job reads them
    assert inputs.policy.max_task_tokens == 200 and inputs.pool_source.startswith("<generated pool")


@pytest.mark.integration
def test_short_workload_cuts_the_paper_tasks_at_64(shared_data, default_tokenizer):
    (short,) = _workloads("--workload", "short")
    inputs = common.load_inputs(
        default_tokenizer,
        short.pool,
        short.tasks,
        short.num_candidates,
        overrides={"max_task_tokens": short.max_task_tokens},
        skip_empty_outputs=short.skip_empty_outputs,
    )
    lengths = [len(ids) for ids in inputs.tokenized_tasks.ids]
    assert len(lengths) == 100 and max(lengths) <= 64
    assert inputs.tokenized_tasks.cut.sum() >= 1
    assert len(inputs.candidates) == 64 and len(inputs.dropped) == 4


@pytest.mark.integration
@pytest.mark.slow
def test_short_workload_run_agrees_with_torch(shared_data, tmp_path):
    out = tmp_path / "bench.json"
    output = bench_scoring.main(
        [
            "--workload",
            "short",
            "--num_candidates",
            "2",
            "--num_tasks",
            "3",
            "--skip_no_cache",
            "--rounds",
            "1",
            "--matmul_size",
            "512",
            "--matmul_repeats",
            "3",
            # conftest has started jax with this many CPU devices; it cannot change now.
            "--cpu_devices",
            os.environ["JAX_NUM_CPU_DEVICES"],
            "--out",
            str(out),
        ]
    )
    assert output["workload"]["name"] == "short"
    summary = output["inputs"]
    assert (summary["candidates"], summary["tasks"], summary["max_task_tokens"]) == (2, 3, 64)
    assert summary["task_tokens_max"] <= 64 and summary["tasks_cut"] >= 1
    assert output["results"]["torch"]["padded_task_tokens"] == 64
    agreement = output["agreement"]["torch"]
    assert agreement["n_tokens_equal"] and agreement["win_rates_identical"]
    assert agreement["max_abs_diff_per_token_one"] < 1e-3 and agreement["max_abs_diff_per_token_zero"] < 1e-3
    assert output["results"]["nuggets_jax"]["compiles_after_warmup"] == 0
    assert set(output["targets"]) == {"useful_fraction_of_peak", "compiles_after_warmup", "speedup_over_torch"}
    assert output["targets"]["speedup_over_torch"]["goal"] == bench_scoring.TARGET_SPEEDUP == 2.0
    assert "candidates_per_call" in output["engine"]
    assert json.loads(out.read_text())["workload"]["name"] == "short"
