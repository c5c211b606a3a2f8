"""Baseline scorers: perplexity and IFD equal a direct computation, chunks and resume keep them."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from nuggets_jax import data, metrics, models
from nuggets_jax.scoring import baselines
from nuggets_jax.store import ScoreStore

OBJECTS = [
    {"instruction": "Add 2 and 3.", "output": "2 plus 3 is 5."},
    {"instruction": "Convert 4 km to metres.", "input": "4 km", "output": "4 km is 4000 metres."},
    {"instruction": "Reverse the word apple.", "output": "The reversed word is elppa."},
    {"instruction": "Name the capital of France.", "output": "Paris is the capital of France."},
    {"instruction": "Sort these words.", "input": "fox dog", "output": "dog fox"},
    {"instruction": "Say yes.", "output": "yes"},
]


def _records():
    return data.records_from_objects([(f"pool[{i}]", o) for i, o in enumerate(OBJECTS)], "pool")


@pytest.fixture(scope="module", params=["no_bos", "bos"])
def tiny(request, tiny_model_dir, tiny_bos_model_dir):
    return models.load_model(str(tiny_model_dir if request.param == "no_bos" else tiny_bos_model_dir))


def _sum_logp(model, rows: list[list[int]], scored_from: list[int]) -> np.ndarray:
    """Per row: summed log p of its tokens from `scored_from` on, from one plain forward in float64."""
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    logits = np.asarray(model(jnp.asarray(tokens))).astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    logp = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
    return np.asarray(
        [
            sum(logp[i, q - 1, r[q]] for q in range(s, len(r)))
            for i, (r, s) in enumerate(zip(rows, scored_from, strict=True))
        ]
    )


def _direct(model, tokenizer, records):
    """(perplexity, response_ppl, ifd) per record, computed here without the engine."""
    template = data.Template()
    lead = data.leading_special_tokens(tokenizer)
    prompts = [lead + tokenizer(template.prompt(r), add_special_tokens=False)["input_ids"] for r in records]
    responses = [tokenizer(r.output, add_special_tokens=False)["input_ids"] for r in records]
    cond = _sum_logp(model, [p + r for p, r in zip(prompts, responses, strict=True)], [len(p) for p in prompts])
    alone = _sum_logp(model, [lead + r for r in responses], [max(1, len(lead))] * len(records))
    n_cond = np.asarray([len(r) for r in responses], np.float64)
    n_alone = np.asarray([len(lead) + len(r) - max(1, len(lead)) for r in responses], np.float64)
    ppl = np.exp(-cond / n_cond)
    with np.errstate(divide="ignore", invalid="ignore"):
        response_ppl = np.where(n_alone > 0, np.exp(-alone / n_alone), np.nan)
    return ppl, response_ppl, ppl / response_ppl, n_cond


def _pass(tiny, tmp_path, chunk_records, records=None):
    records = records or _records()
    seqs = baselines.sequences(tiny.tokenizer, records, data.Template(), data.TokenPolicy(), "pool")
    store = ScoreStore(tmp_path)
    config = baselines.BaselineConfig(chunk_records=chunk_records, ifd_max=float("inf"))
    engine = baselines.build_engine(tiny.model, seqs, config, log=lambda m: None)
    return baselines.run_baselines(engine, seqs, store, config, progress=False), store


def test_perplexity_and_ifd_equal_a_direct_computation(tiny, tmp_path):
    result, _ = _pass(tiny, tmp_path, chunk_records=1024)
    values = metrics.baseline_scores(result.arrays, ifd_max=float("inf"))
    ppl, response_ppl, ifd, n_cond = _direct(tiny.model, tiny.tokenizer, _records())
    np.testing.assert_array_equal(result.arrays["cond_tokens"], n_cond)
    np.testing.assert_array_equal(result.arrays["length"], n_cond)  # nothing cut at 512 tokens
    np.testing.assert_allclose(values["perplexity"], ppl, rtol=1e-4)
    np.testing.assert_allclose(values["response_ppl"], response_ppl, rtol=1e-4)
    np.testing.assert_allclose(values["ifd"], ifd, rtol=1e-4)
    # Without leading special tokens the first response token is context: a one-token response
    # ("yes" is one token when the tokenizer learnt it) has nothing to score alone.
    assert np.isnan(values["ifd"]).sum() == np.isnan(response_ppl).sum()


def test_ifd_at_or_above_ifd_max_gets_nan_and_random_is_seeded(tiny, tmp_path):
    result, _ = _pass(tiny, tmp_path, chunk_records=1024)
    raw = metrics.baseline_scores(result.arrays, ifd_max=float("inf"))["ifd"]
    cap = float(np.nanmedian(raw))
    capped = metrics.baseline_scores(result.arrays, ifd_max=cap)["ifd"]
    keep = raw < cap
    np.testing.assert_array_equal(capped[keep], raw[keep])
    assert np.isnan(capped[~keep]).all() and (~keep).any()
    a, b = (metrics.baseline_scores(result.arrays, seed=s)["random"] for s in (3, 4))
    np.testing.assert_array_equal(a, metrics.baseline_scores(result.arrays, seed=3)["random"])
    assert not np.array_equal(a, b) and ((a >= 0) & (a < 1)).all()


def test_chunks_and_resume_give_the_single_pass_values(tiny, tmp_path):
    whole, _ = _pass(tiny, tmp_path / "whole", chunk_records=1024)
    chunked, store = _pass(tiny, tmp_path / "chunked", chunk_records=2)
    assert len(store.names(baselines.CHUNK_PREFIX)) == 3
    for key in baselines.ARRAYS:
        np.testing.assert_allclose(chunked.arrays[key], whole.arrays[key], rtol=1e-5)
    # A killed run: one chunk lost, the others read back and not recomputed.
    store.path(f"{baselines.CHUNK_PREFIX}000001").unlink()
    resumed, _ = _pass(tiny, tmp_path / "chunked", chunk_records=2)
    assert resumed.resumed_candidates == 4 and resumed.stats.candidates == 2
    for key in baselines.ARRAYS:
        np.testing.assert_allclose(resumed.arrays[key], whole.arrays[key], rtol=1e-5)


def test_length_counts_the_response_before_the_cut(tiny, tmp_path):
    records = _records()
    prompts = [len(tiny.tokenizer(data.Template().prompt(r), add_special_tokens=False)["input_ids"]) for r in records]
    policy = data.TokenPolicy(max_task_tokens=max(prompts) + 1)  # every response keeps a token, most are cut
    seqs = baselines.sequences(tiny.tokenizer, records, data.Template(), policy, "pool")
    full = [len(tiny.tokenizer(r.output, add_special_tokens=False)["input_ids"]) for r in records]
    np.testing.assert_array_equal(seqs.length, full)
    assert (seqs.tasks.n_tokens[: len(records)] <= np.asarray(full)).all()
    assert (seqs.tasks.n_tokens[: len(records)] < np.asarray(full)).any()


def test_a_candidate_whose_prompt_fills_the_cut_gets_nan_and_the_others_keep_their_values(tiny, tmp_path):
    records = _records()
    long = data.records_from_objects(
        [("pool[6]", {"id": "long", "instruction": "Repeat: " + "apple pear " * 40, "output": "apple pear"})], "pool"
    )
    prompts = [len(tiny.tokenizer(data.Template().prompt(r), add_special_tokens=False)["input_ids"]) for r in records]
    limit = max(prompts) + 40  # every short record keeps its whole response, the long prompt fills the cut
    policy = data.TokenPolicy(max_task_tokens=limit)
    mixed = [*records[:3], long[0], *records[3:]]
    seqs = baselines.sequences(tiny.tokenizer, mixed, data.Template(), policy, "pool")
    assert seqs.unscorable == ("long",) and 3 not in seqs.prompted and 3 not in seqs.alone
    whole = len(tiny.tokenizer("apple pear", add_special_tokens=False)["input_ids"])
    assert seqs.length[3] == whole  # the length baseline still counts its response
    config = baselines.BaselineConfig(chunk_records=1, ifd_max=float("inf"))  # its own chunk has no column
    assert len(baselines.chunk_columns(seqs, 1)) == len(records)
    engine = baselines.build_engine(tiny.model, seqs, config, log=lambda m: None)
    result = baselines.run_baselines(engine, seqs, ScoreStore(tmp_path), config, progress=False)
    values = metrics.baseline_scores(result.arrays, ifd_max=float("inf"))
    for key in ("perplexity", "ifd", "response_ppl"):
        assert np.isnan(values[key][3])
    ppl, response_ppl, ifd, _ = _direct(tiny.model, tiny.tokenizer, records)
    rest = np.r_[0:3, 4:7]
    np.testing.assert_allclose(values["perplexity"][rest], ppl, rtol=1e-4)
    np.testing.assert_allclose(values["ifd"][rest], ifd, rtol=1e-4)
    assert result.stats.candidates == len(records)


def test_unknown_fields_and_bad_values_are_refused():
    with pytest.raises(baselines.BaselineError, match="chunk_record"):
        baselines.BaselineConfig.from_mapping({"chunk_record": 3})
    with pytest.raises(baselines.BaselineError, match="chunk_records"):
        baselines.BaselineConfig.from_mapping({"chunk_records": 0})
    assert json.dumps(metrics.BASELINE_FORMULAS)  # every baseline documented
    assert set(metrics.BASELINE_FORMULAS) == set(metrics.BASELINES)


# -- the scoring job with a baseline metric, or with baselines.compute -----------------------------


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    from nuggets_jax.synthetic import generate as synthetic

    d = tmp_path_factory.mktemp("baseline_inputs")
    (d / "pool.json").write_text(json.dumps(synthetic.generate_pool(24, seed=5)))
    (d / "tasks.json").write_text(json.dumps(synthetic.generate_tasks(6, seed=6)))
    return d / "pool.json", d / "tasks.json"


def _ranking(workdir):
    return [json.loads(line) for line in (workdir / "ranking.jsonl").read_text().splitlines()]


def test_a_baseline_metric_ranks_the_pool_without_a_task_set(tmp_path, tiny_model_dir, job_inputs):
    from tests.test_job import run, score_cmd

    workdir = tmp_path / "ifd"
    run(score_cmd(tiny_model_dir, *job_inputs, workdir, "--config.metric=ifd", "--config.baselines.chunk_records=10"))
    lines = _ranking(workdir)
    assert not (workdir / "scores.npz").exists() and len(lines) == 24
    saved = dict(np.load(workdir / "baselines.npz"))
    assert set(metrics.BASELINES) | set(metrics.BASELINE_ARRAYS) <= set(saved)
    ifd = np.asarray([np.nan if line["ifd"] is None else line["ifd"] for line in lines])
    finite = ifd[np.isfinite(ifd)]
    assert (np.diff(finite) <= 0).all() and np.isnan(ifd[finite.size :]).all()  # best first, NaN (>= 1) last
    assert all(set(metrics.BASELINES) <= set(line) and "win_rate" not in line for line in lines)
    golden = json.loads((workdir / "golden.json").read_text())
    assert [g["nuggets"]["rank"] for g in golden] == [1, 2, 3]  # top_fraction 0.1 of 24
    run_json = json.loads((workdir / "run.json").read_text())
    assert run_json["mode"] == "baselines" and run_json["counts"]["tasks"] == 0
    assert run_json["compiles_after_warmup"] == 0 and run_json["baselines"]["candidates"] == 24
    assert "`ifd`" in (workdir / "report.md").read_text()


def test_baselines_compute_adds_columns_and_keeps_the_nuggets_ranking(tmp_path, tiny_model_dir, job_inputs):
    from tests.test_job import run, score_cmd

    plain, both = tmp_path / "plain", tmp_path / "both"
    run(score_cmd(tiny_model_dir, *job_inputs, plain))
    run(score_cmd(tiny_model_dir, *job_inputs, both, "--config.baselines.compute=True"))
    with_baselines, without = _ranking(both), _ranking(plain)
    assert [line["id"] for line in with_baselines] == [line["id"] for line in without]
    for a, b in zip(with_baselines, without, strict=True):
        assert {k: a[k] for k in b} == b
    assert (plain / "scores.npz").read_bytes() == (both / "scores.npz").read_bytes()
    # The baseline columns are baselines.npz's values, candidate by candidate (pool order).
    pool = json.loads(job_inputs[0].read_text())
    position = {str(obj.get("id", i)): i for i, obj in enumerate(pool)}
    saved = dict(np.load(both / "baselines.npz"))
    for line in with_baselines:
        i = position[str(line["id"])]
        assert line["length"] == saved["length"][i]
        assert line["perplexity"] == pytest.approx(saved["perplexity"][i], rel=1e-12)


def test_baselines_compute_is_refused_in_adaptive_mode(tmp_path, tiny_model_dir, job_inputs):
    from tests.test_job import run, score_cmd

    proc = run(
        score_cmd(
            tiny_model_dir,
            *job_inputs,
            tmp_path / "w",
            "--config.baselines.compute=True",
            "--config.scoring.mode=adaptive",
        ),
        check=False,
    )
    assert proc.returncode != 0 and "baselines.compute=True needs scoring.mode=exact" in proc.stderr
    assert "Traceback" not in proc.stderr
