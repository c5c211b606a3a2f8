"""Predefined task sets: K-means over model embeddings of a pool sample, or a random sample.

The paper's recipe (docs/ARCHITECTURE.md): sample M examples of a pool with a seed, embed each
with the scoring model (mean of the final hidden layer over its real tokens), cluster them with
K-means into K clusters and keep the example nearest each centroid. The random baseline keeps K
examples of the same sample. A task set is written in the input format (a .json list), each
record carrying its own fields plus `"taskset": {"pool_id", "cluster", "distance"}`, next to a
sidecar `<name>.provenance.json` that says exactly how it was built; a sidecar equal to the one a
request would write means the file can be reused as is. The examples come from a
`source.Source` (a file or the generated tasks, minus exclusions and filters).

Determinism: the sample depends only on (eligible pool, M, seed); K-means is seeded; the pick of
a cluster is its member nearest the centroid, ties going to the earlier example. Random picks are
the first K of one seeded permutation of the sample, so for a seed the smaller random sets are
prefixes of the larger ones (nested, which also keeps the union of a sweep small).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import store as store_lib
from nuggets_jax.scoring.embedding import (
    EMBEDDING,
    EMBEDDING_TEXTS,
    EmbeddingConfig,
    embed_records,
)
from nuggets_jax.tasksets import source as source_lib
from nuggets_jax.tasksets.source import Source, TaskSetError

CONSTRUCTIONS = ("kmeans", "random")
TASKSET_FIELD = "taskset"
# Sidecar keys that decide whether a saved task set answers a request (the rest is outcome).
REQUEST_KEYS = (
    "construction",
    "k",
    "m",
    "seed",
    "n_init",
    "pool",
    "pool_sha256",
    "exclude",
    "model",
    "model_fingerprint",
    "dtype",
    "embedding",
    "embedding_text",
    "embedding_max_tokens",
    "template",
    "filters",
)


# -- picking K examples of a sample ---------------------------------------------------------------


def sample_indices(num_eligible: int, m: int, seed: int) -> np.ndarray:
    """M positions in [0, num_eligible), sorted, drawn without replacement; m <= 0 or m >= E = all."""
    if m <= 0 or m >= num_eligible:
        return np.arange(num_eligible)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_eligible, size=m, replace=False))


def random_picks(m: int, k: int, seed: int) -> np.ndarray:
    """K distinct positions in [0, m): the first K of one seeded permutation (nested over K)."""
    if not 1 <= k <= m:
        raise TaskSetError(f"k={k} must be between 1 and the sample size m={m}.")
    # A seed stream of its own, so the picks do not repeat the draw that made the sample.
    return np.random.default_rng([seed, 1]).permutation(m)[:k]


@dataclasses.dataclass(frozen=True)
class KMeansPicks:
    """Result of `kmeans_picks`; every array is aligned with the clusters 0..K-1."""

    picks: np.ndarray  # [K] int: index into the embeddings of the example kept for each cluster
    distances: np.ndarray  # [K] float64: its Euclidean distance to the centroid
    centers: np.ndarray  # [K, D] float64
    labels: np.ndarray  # [M] int: cluster of each example
    inertia: float


def kmeans_picks(embeddings: np.ndarray, k: int, seed: int, n_init: int = 10) -> KMeansPicks:
    """K-means (scikit-learn, k-means++ init, seeded), then the member nearest each centroid.

    Args:
      embeddings: [M, D] one row per example.
      k: clusters (1 <= k <= M).
      seed: `random_state` of KMeans.
      n_init: restarts; the lowest-inertia run wins.

    Returns:
      The kept example of every cluster: its member nearest the centroid (ties: lowest index).
      Being the nearest member it is also the nearest example overall unless another cluster's
      member is closer; a cluster left empty (duplicate embeddings) takes the nearest example not
      kept yet, so the K picks are always distinct.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, np.float64)  # [M, D]
    if x.ndim != 2 or not 1 <= k <= x.shape[0]:
        raise TaskSetError(f"k={k} must be between 1 and the number of embedded examples ({x.shape[0]}).")
    if n_init < 1:
        raise TaskSetError(f"n_init must be at least 1, got {n_init}.")
    model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    centers = model.cluster_centers_  # [K, D]
    labels = model.labels_

    def distance_to(j: int) -> np.ndarray:  # [M]; one centroid at a time keeps memory at [M, D]
        return np.sqrt(((x - centers[j]) ** 2).sum(-1))

    picks = np.full(k, -1, np.int64)
    for j in range(k):
        members = np.flatnonzero(labels == j)
        if members.size:
            picks[j] = members[np.argmin(distance_to(j)[members])]
    for j in np.flatnonzero(picks < 0):
        taken = np.zeros(x.shape[0], bool)
        taken[picks[picks >= 0]] = True
        picks[j] = int(np.argmin(np.where(taken, np.inf, distance_to(j))))
    distances = np.asarray([distance_to(j)[picks[j]] for j in range(k)])
    return KMeansPicks(picks, distances, centers, labels, float(model.inertia_))


# -- building task sets ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSetSpec:
    """What to build: the construction, K, the sample size M and the seed."""

    construction: str = "kmeans"
    k: int = 100
    m: int = 1000
    seed: int = 0
    n_init: int = 10

    def check(self) -> None:
        if self.construction not in CONSTRUCTIONS:
            raise TaskSetError(
                f"unknown construction {self.construction!r}; choose one of: {', '.join(CONSTRUCTIONS)}."
            )
        if self.k < 1:
            raise TaskSetError(f"k must be at least 1, got {self.k}.")
        if self.m and self.m < self.k:
            raise TaskSetError(f"m={self.m} examples cannot give k={self.k} tasks; set m >= k (or m=0 for all).")

    @property
    def name(self) -> str:
        return f"{self.construction}_k{self.k}_m{self.m}_s{self.seed}"


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """A built task set: records in the input format (with their "taskset" field) and the sidecar."""

    records: list[dict[str, Any]]
    provenance: dict[str, Any]

    @property
    def pool_ids(self) -> list[str]:
        return [r[TASKSET_FIELD]["pool_id"] for r in self.records]


class TaskSetBuilder:
    """Builds task sets from one source with one model; embeddings are computed once per example.

    The model is loaded on first need (a random construction never loads it).
    """

    def __init__(
        self,
        source: Source,
        model_path: str = "default",
        dtype: str = "float32",
        template: data_lib.Template | data_lib.ChatTemplate | None = None,
        embedding: EmbeddingConfig | None = None,
        log: Callable[[str], None] = print,
    ):
        self.source = source
        self.model_path = str(model_path)
        self.dtype = dtype
        self.template = template or data_lib.Template()
        self.embedding = embedding or EmbeddingConfig()
        if self.embedding.text not in EMBEDDING_TEXTS:
            raise TaskSetError(
                f"unknown embedding text {self.embedding.text!r}; choose one of: {', '.join(EMBEDDING_TEXTS)}."
            )
        self.log = log
        self._loaded = None
        self._model_fingerprint: str | None = None
        self._cache: dict[int, np.ndarray] = {}  # source index -> [D]
        self.embed_s = 0.0
        self.embedded = 0

    @property
    def loaded(self):
        if self._loaded is None:
            from nuggets_jax import models

            self._loaded = models.load_model(self.model_path, dtype=self.dtype)
        return self._loaded

    @property
    def model_fingerprint(self) -> str:
        if self._model_fingerprint is None:
            from nuggets_jax import models

            self._model_fingerprint = models.model_fingerprint(models.resolve_model_dir(self.model_path))
        return self._model_fingerprint

    def sample(self, spec: TaskSetSpec) -> np.ndarray:
        """Source indices [M] of the spec's sample (sorted)."""
        eligible = self.source.eligible
        if spec.m > len(eligible):
            raise TaskSetError(
                f"{self.source.path}: m={spec.m} but only {len(eligible)} records can be drawn "
                f"({(self.source.exclude or {}).get('removed', 0)} excluded); lower m or use m=0 for all."
            )
        return eligible[sample_indices(len(eligible), spec.m, spec.seed)]

    def embed(self, indices: Sequence[int]) -> np.ndarray:
        """[len(indices), D] embeddings of source records, computing only those not cached."""
        missing = sorted({int(i) for i in indices} - set(self._cache))
        if missing:
            records = [self.source.records[i] for i in missing]
            loaded = self.loaded
            vectors, stats = embed_records(loaded.model, loaded.tokenizer, records, self.template, self.embedding)
            self.embed_s += stats.wall_s
            self.embedded += len(missing)
            self.log(
                f"embedded {len(missing)} examples ({stats.tokens} tokens, {stats.padded_tokens} with padding, "
                f"buckets {list(stats.buckets)}, {stats.programs} programs) in {stats.wall_s:.1f}s "
                f"({stats.tokens / max(stats.wall_s, 1e-9):.0f} tokens/s)"
            )
            self._cache.update(zip(missing, vectors, strict=True))
        return np.stack([self._cache[int(i)] for i in indices]) if len(indices) else np.zeros((0, 0), np.float32)

    def request(self, spec: TaskSetSpec) -> dict[str, Any]:
        """The sidecar keys that identify the task set `spec` would give (`REQUEST_KEYS`)."""
        spec.check()
        kmeans = spec.construction == "kmeans"
        return {
            "construction": spec.construction,
            "k": spec.k,
            "m": spec.m,
            "seed": spec.seed,
            "n_init": spec.n_init if kmeans else None,
            "pool": self.source.path,
            "pool_sha256": self.source.sha256,
            "exclude": self.source.exclude,
            "filters": list(self.source.filters),
            "model": self.model_path if kmeans else None,
            "model_fingerprint": self.model_fingerprint if kmeans else None,
            "dtype": self.dtype if kmeans else None,
            "embedding": EMBEDDING if kmeans else None,
            "embedding_text": self.embedding.text if kmeans else None,
            "embedding_max_tokens": self.embedding.max_tokens if kmeans else None,
            "template": self.template.describe() if kmeans else None,
        }

    def build(self, spec: TaskSetSpec) -> TaskSet:
        """Draws the sample, picks K examples and returns them with their provenance."""
        provenance = self.request(spec)
        sample = self.sample(spec)  # [M] source indices
        if spec.k > len(sample):
            raise TaskSetError(f"{self.source.path}: k={spec.k} is more than the {len(sample)} sampled records.")
        if spec.construction == "kmeans":
            self.loaded  # noqa: B018 -- load before the clock starts: build_s is the construction alone
        t0 = time.perf_counter()
        if spec.construction == "kmeans":
            result = kmeans_picks(self.embed(sample), spec.k, spec.seed, spec.n_init)
            chosen = sample[result.picks]
            cluster = [int(c) for c in range(spec.k)]
            distance = [float(d) for d in result.distances]
            provenance["inertia"] = result.inertia
        else:
            chosen = sample[random_picks(len(sample), spec.k, spec.seed)]
            cluster = [None] * spec.k
            distance = [None] * spec.k
        # Source order, so a task set file reads like its pool.
        order = np.argsort(chosen, kind="stable")
        records = []
        for j in order:
            record = self.source.records[int(chosen[j])]
            taskset = {"pool_id": record.id, "cluster": cluster[j], "distance": distance[j]}
            records.append({**record.raw, TASKSET_FIELD: taskset})
        provenance.update(
            name=spec.name,
            sample_size=int(len(sample)),
            eligible=int(len(self.source.eligible)),
            pool_ids=[r[TASKSET_FIELD]["pool_id"] for r in records],
            build_s=time.perf_counter() - t0,
        )
        return TaskSet(records, provenance)


def provenance_path(path: str | pathlib.Path) -> pathlib.Path:
    """`<dir>/<name>.provenance.json` for the task-set file `<dir>/<name>.json`."""
    path = pathlib.Path(path)
    return path.with_name(path.name.removesuffix(".json") + ".provenance.json")


def write_taskset(path: str | pathlib.Path, taskset: TaskSet) -> pathlib.Path:
    """Writes the task set (a .json list) and its sidecar; the sidecar last, as the 'done' mark."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(taskset.records, ensure_ascii=False, indent=1) + "\n"
    store_lib.atomic_write_bytes(path, text.encode("utf-8"))
    sidecar = {**taskset.provenance, "file_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    store_lib.atomic_write_bytes(provenance_path(path), json.dumps(sidecar, indent=2, ensure_ascii=False).encode())
    return path


def read_taskset(path: str | pathlib.Path) -> TaskSet:
    """Reads a task set written by `write_taskset` (both files)."""
    path = pathlib.Path(path)
    side = provenance_path(path)
    if not side.is_file():
        raise TaskSetError(f"{path}: no provenance file {side.name} next to it; rebuild the task set.")
    records = []
    for where, record in data_lib.read_objects(path, "the task-set file", error=TaskSetError):
        if not isinstance(record, dict) or TASKSET_FIELD not in record:
            raise TaskSetError(f'{where}: record has no "{TASKSET_FIELD}" field; rebuild the task set.')
        records.append(record)
    return TaskSet(records, json.loads(side.read_text(encoding="utf-8")))


def saved_matches(path: str | pathlib.Path, request: dict[str, Any]) -> bool:
    """True when `path` holds a complete task set built for exactly `request`."""
    path = pathlib.Path(path)
    side = provenance_path(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        saved = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    if hashlib.sha256(path.read_bytes()).hexdigest() != saved.get("file_sha256"):
        return False
    return all(saved.get(key) == request.get(key) for key in REQUEST_KEYS)


def build_or_reuse(
    builder: TaskSetBuilder, spec: TaskSetSpec, path: str | pathlib.Path, write: bool = True
) -> tuple[TaskSet, bool]:
    """The task set at `path` if it answers `spec`, else a new one (written when `write`).

    Returns:
      (task set, reused).
    """
    request = builder.request(spec)
    if saved_matches(path, request):
        return read_taskset(path), True
    taskset = builder.build(spec)
    if write:
        write_taskset(path, taskset)
    return taskset, False


def build_from_config(config, workdir: str | pathlib.Path, log: Callable[[str], None] = print) -> pathlib.Path:
    """One task set from a `configs/taskset.py` config: written to workdir/<name>.json with its
    provenance, or reused when a saved one answers the same request.

    Returns:
      The task set's path.
    """
    spec = TaskSetSpec(config.construction, config.k, config.m, config.seed, config.n_init)
    spec.check()
    source = source_lib.load_source(config.source, config.exclude or None, log=log)
    chat = (config.data.get("template") or "text") == "chat"
    tokenizer = source_lib.load_tokenizer(config.model.path) if chat or config.max_task_tokens else None
    template = data_lib.template_of(config.data, tokenizer, config.model.path)
    if config.max_task_tokens:
        eligible = [source.records[i] for i in source.eligible]
        fits = source_lib.prompt_fits(tokenizer, eligible, template, config.max_task_tokens)
        source = source_lib.restrict(source, fits, f"prompt shorter than max_task_tokens={config.max_task_tokens}")
    embedding = EmbeddingConfig(**config.embedding.to_dict())
    builder = TaskSetBuilder(source, config.model.path, config.model.dtype, template, embedding, log=log)
    path = pathlib.Path(workdir).expanduser() / f"{config.name or spec.name}.json"
    result, reused = build_or_reuse(builder, spec, path)
    log(
        f"{'reused' if reused else 'wrote'} {path} ({len(result.records)} tasks, {spec.construction} of "
        f"{result.provenance['sample_size']} sampled from {len(source.eligible)} eligible records) and "
        f"{provenance_path(path).name}"
    )
    return path
