"""Task-set construction: padding-free mean pooling, K-means and random picks, files and provenance."""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.cluster import KMeans

from nuggets_jax import data, models
from nuggets_jax.scoring import embedding as embedding
from nuggets_jax.synthetic import generate as synthetic
from nuggets_jax.tasksets import build as taskset
from nuggets_jax.tasksets import source as taskset_source
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_model(str(tiny_model_dir))


def _ids(loaded, n=7):
    records = data.records_from_objects([(str(i), o) for i, o in enumerate(synthetic.generate_tasks(n))], "t", "tasks")
    texts = embedding.embedding_texts(records, data.Template())
    return embedding.tokenize_for_embedding(loaded.tokenizer, texts, 256)


def test_masked_mean_ignores_padding_values():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    spoiled = h.copy()
    spoiled[~mask] = 1e6  # padding positions hold garbage
    got = np.asarray(embedding.masked_mean(jnp.asarray(spoiled), jnp.asarray(mask)))
    np.testing.assert_allclose(got[0], h[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got[1], h[1, 0], rtol=1e-6)


def test_embedding_equals_unpadded_mean_for_any_batch(tiny):
    ids = _ids(tiny, 9)
    ids = list({len(t): t for t in ids}.values())[:4]  # four different lengths
    assert len(ids) == 4
    # Independent: each sequence alone, no padding at all, plain mean of the hidden states.
    graphdef, state = nnx.split(tiny.model)
    plain_mean = jax.jit(lambda state, tokens: nnx.merge(graphdef, state).hidden(tokens).mean(1))
    alone = np.concatenate([np.asarray(plain_mean(state, jnp.asarray(t)[None])) for t in ids])
    together, stats = embedding.embed_token_ids(tiny.model, ids, batch_tokens=4096, max_buckets=2)
    assert stats.padded_tokens > stats.tokens  # padding was really there
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=1e-5)
    # A different batch composition: more right padding (one bucket), other sequences, another order.
    extra = _ids(tiny, 12)[9:]
    mixed_ids = [*extra[:2], *ids[::-1], *extra[2:]]
    mixed, stats = embedding.embed_token_ids(tiny.model, mixed_ids, batch_tokens=4096, max_buckets=1)
    assert stats.programs == 1
    np.testing.assert_allclose(mixed[2 : 2 + len(ids)][::-1], alone, atol=1e-5, rtol=1e-5)


def _blobs(seed=0, k=6, per=10, d=8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=20.0, size=(k, d))
    return np.concatenate([c + rng.normal(size=(per, d)) for c in centers])


def test_kmeans_picks_are_nearest_to_sklearn_centroids_and_deterministic():
    x = _blobs()
    result = taskset.kmeans_picks(x, k=6, seed=3, n_init=4)
    again = taskset.kmeans_picks(x, k=6, seed=3, n_init=4)
    np.testing.assert_array_equal(result.picks, again.picks)
    # Independently: the same KMeans fit, then the example nearest each centroid over all examples.
    centers = KMeans(n_clusters=6, n_init=4, random_state=3).fit(x).cluster_centers_
    distances = np.linalg.norm(x[:, None] - centers[None], axis=-1)  # [M, K]
    np.testing.assert_array_equal(result.picks, distances.argmin(0))
    np.testing.assert_allclose(result.distances, distances.min(0), rtol=1e-9)
    assert len(set(result.picks.tolist())) == 6


def test_kmeans_pick_is_nearest_member_on_overlapping_data():
    x = np.random.default_rng(1).normal(size=(80, 5))
    result = taskset.kmeans_picks(x, k=9, seed=0, n_init=2)
    fit = KMeans(n_clusters=9, n_init=2, random_state=0).fit(x)
    for j, c in enumerate(fit.cluster_centers_):
        members = np.flatnonzero(fit.labels_ == j)
        assert result.picks[j] == members[np.argmin(np.linalg.norm(x[members] - c, axis=1))]


def test_kmeans_with_fewer_distinct_points_than_clusters_keeps_distinct_picks():
    x = np.repeat(np.eye(3), 4, axis=0)  # 3 distinct points, 12 rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that it found fewer distinct clusters
        result = taskset.kmeans_picks(x, k=5, seed=0, n_init=1)
    assert len(set(result.picks.tolist())) == 5
    # Every distinct point is among the picks.
    assert {tuple(p) for p in x[result.picks]} == {tuple(p) for p in np.eye(3)}


def test_random_picks_deterministic_distinct_nested():
    a = taskset.random_picks(50, 10, seed=4)
    np.testing.assert_array_equal(a, taskset.random_picks(50, 10, seed=4))
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(taskset.random_picks(50, 5, seed=4), a[:5])
    assert not np.array_equal(a, taskset.random_picks(50, 10, seed=5))
    with pytest.raises(taskset_source.TaskSetError, match="between 1 and"):
        taskset.random_picks(5, 6, seed=0)


def test_sample_indices():
    s = taskset.sample_indices(100, 30, seed=2)
    assert len(set(s.tolist())) == 30 and list(s) == sorted(s)
    np.testing.assert_array_equal(s, taskset.sample_indices(100, 30, seed=2))
    np.testing.assert_array_equal(taskset.sample_indices(10, 0, seed=2), np.arange(10))
    np.testing.assert_array_equal(taskset.sample_indices(10, 50, seed=2), np.arange(10))


def test_read_valid_records_skips_bad_records_and_keeps_positions(tmp_path):
    objects = [
        {"instruction": "a", "output": "x"},
        {"instruction": "b", "output": " "},
        {"instruction": "c", "output": "z", "extra": 1},
    ]
    path = tmp_path / "src.json"
    path.write_text(json.dumps(objects))
    records, skipped = taskset_source.read_valid_records(path)
    assert [r.id for r in records] == ["0", "2"] and [r.position for r in records] == [0, 2]
    assert len(skipped) == 1 and "[1]" in skipped[0] and '"output" is empty' in skipped[0]
    source = taskset_source.load_source(str(path), exclude=[records[0]], log=lambda m: None)
    assert source.eligible.tolist() == [1] and source.exclude["removed"] == 1


def test_exclusion_by_content(tmp_path):
    objects = synthetic.generate_tasks(40)
    path = tmp_path / "src.json"
    path.write_text(json.dumps(objects))
    banned = [dict(o, id=f"other-{i}") for i, o in enumerate(objects[:15])]  # same examples, other ids
    (tmp_path / "pool.json").write_text(json.dumps(banned))
    source = taskset_source.load_source(str(path), exclude=str(tmp_path / "pool.json"))
    keys = {(o["instruction"], o["input"], o["output"]) for o in banned}
    drawn = [source.records[i] for i in source.eligible]
    assert drawn and not any(taskset_source.content_key(r) in keys for r in drawn)
    assert source.exclude["removed"] == sum((o["instruction"], o["input"], o["output"]) in keys for o in objects)


def test_builder_kmeans_and_random(tmp_path, tiny_model_dir):
    source = taskset_source.load_source("default")
    builder = taskset.TaskSetBuilder(source, str(tiny_model_dir), log=lambda m: None)
    spec = taskset.TaskSetSpec("kmeans", k=4, m=24, seed=1, n_init=2)
    built = builder.build(spec)
    sample = builder.sample(spec)
    # Independent check: K-means over the sample's embeddings; each pick nearest its cluster's centroid.
    x = builder.embed(sample).astype(np.float64)
    fit = KMeans(n_clusters=4, n_init=2, random_state=1).fit(x)
    by_id = {source.records[i].id: n for n, i in enumerate(sample)}
    for record in built.records:
        t = record["taskset"]
        members = np.flatnonzero(fit.labels_ == t["cluster"])
        d = np.linalg.norm(x[members] - fit.cluster_centers_[t["cluster"]], axis=1)
        assert by_id[t["pool_id"]] == members[np.argmin(d)]
        assert t["distance"] == pytest.approx(d.min(), rel=1e-9)
    assert builder.build(spec).records == built.records
    rand = builder.build(taskset.TaskSetSpec("random", k=4, m=24, seed=1))
    assert len({r["taskset"]["pool_id"] for r in rand.records}) == 4
    assert all(r["taskset"]["cluster"] is None for r in rand.records)
    assert rand.provenance["model"] is None and built.provenance["model"] == str(tiny_model_dir)
    # Written in the input format, with the sidecar; the request matches until something changes.
    path = taskset.write_taskset(tmp_path / "k4.json", built)
    records = data.read_records(path, "tasks")
    assert [r.raw for r in records] == built.records
    assert taskset.saved_matches(path, builder.request(spec))
    assert not taskset.saved_matches(path, builder.request(taskset.TaskSetSpec("kmeans", 4, 24, 2, 2)))


def _cli(tiny_model_dir, workdir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "experiments.build_taskset",
        "--config=configs/taskset.py:runlocal",
        f"--config.model.path={tiny_model_dir}",
        f"--workdir={workdir}",
        *extra,
    ]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_build_taskset_cli_writes_provenance_and_reuses(tmp_path, tiny_model_dir):
    first = _cli(tiny_model_dir, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    path = tmp_path / "kmeans_k5_m50_s0.json"
    items = json.loads(path.read_text())
    source = {o["id"]: o for o in synthetic.generate_tasks(taskset_source.DEFAULT_SOURCE_SIZE)}
    assert len(items) == 5
    for item in items:
        assert {k: v for k, v in item.items() if k != "taskset"} == source[item["taskset"]["pool_id"]]
        assert set(item["taskset"]) == {"pool_id", "cluster", "distance"}
    provenance = json.loads((tmp_path / "kmeans_k5_m50_s0.provenance.json").read_text())
    for key in ("pool", "pool_sha256", "seed", "m", "k", "construction", "model", "n_init", "embedding"):
        assert key in provenance
    assert provenance["embedding"] == "mean of final hidden layer over real tokens"
    assert (provenance["k"], provenance["m"], provenance["seed"]) == (5, 50, 0)
    second = _cli(tiny_model_dir, tmp_path, "--config.k=60")
    assert second.returncode == 2 and "m=50 examples cannot give k=60 tasks" in second.stderr
    third = _cli(tiny_model_dir, tmp_path)
    assert third.returncode == 0 and "reused" in third.stderr


def test_prompt_filter_restricts_the_source_and_enters_the_provenance(tiny):
    source = taskset_source.load_source("default")
    template = data.Template()
    eligible = [source.records[i] for i in source.eligible]
    prompts = [len(tiny.tokenizer(template.prompt(r), add_special_tokens=False)["input_ids"]) for r in eligible]
    limit = int(np.median(prompts))
    fits = taskset_source.prompt_fits(tiny.tokenizer, eligible, template, limit)
    np.testing.assert_array_equal(fits, np.asarray(prompts) < limit)
    restricted = taskset_source.restrict(source, fits, f"prompt shorter than {limit}")
    assert len(restricted.eligible) == int(fits.sum()) < len(source.eligible)
    assert restricted.filters == (f"prompt shorter than {limit} (removed {int((~fits).sum())})",)
    builder = taskset.TaskSetBuilder(restricted, "unused", log=lambda m: None)
    built = builder.build(taskset.TaskSetSpec("random", k=8, m=0, seed=0))
    by_id = {r.id: r for r in source.records}
    for item in built.records:
        prompt = template.prompt(by_id[item["taskset"]["pool_id"]])
        assert len(tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]) < limit
    assert built.provenance["filters"] == list(restricted.filters)
    with pytest.raises(taskset_source.TaskSetError, match="no record is left"):
        taskset_source.restrict(source, np.zeros(len(source.eligible), bool), "nothing")
