"""Sharded fine-tuning: FSDP and tensor-parallel meshes train the parameters of a replicated run, the
state is split over the devices, remat changes nothing, and a killed run resumes on another mesh.

The model is a random-init Llama with small weights (normal 0.02) on the tiny tokenizer: the
conftest model's large weights make it ill-conditioned, so a different partitioning moves its
gradients by up to 1e-3 relative. 8 heads and 4 KV heads let the attention split at model 2 and 4.
Runs are trained once per module (`Runs`) and shared by the tests; the tests are ordered so the
compiled step programs (`finetune.step._COMPILED`, four kept) are reused where they can be.
"""

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from nuggets_jax import data, models, sharding, synthetic
from nuggets_jax.finetune import data as finetune_data
from nuggets_jax.finetune import step as finetune_step
from nuggets_jax.finetune import train as finetune
from nuggets_jax.models.llama import Llama
from nuggets_jax.scoring import memory

from .conftest import build_tiny_model_dir

DEVICES = 8
# Every run: 4 steps of 2 accumulated micro-batches of 8 rows, a checkpoint every 2 steps. A small
# learning rate: AdamW turns float noise on near-zero gradients into whole lr-sized updates.
CONFIG = finetune_step.TrainConfig(
    steps=4,
    batch_rows=8,
    micro_batches=2,
    learning_rate=1e-3,
    warmup_steps=1,
    checkpoint_every=2,
    keep_checkpoints=3,
)


class Killed(Exception):
    """Raised from `on_step` to stop a run the way a killed job stops."""


def _kill_at(step: int):
    def on_step(done: int, entry: dict) -> None:
        if done == step:
            raise Killed

    return on_step


def _arrays(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _max_diff(a, b) -> float:
    pairs = zip(_arrays(a), _arrays(b), strict=True)
    return max(float(np.abs(x - y).max()) for x, y in pairs)


def _named(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _log_columns(run_dir: pathlib.Path, *names: str) -> dict[str, list]:
    entries = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line]
    return {name: [e[name] for e in entries] for name in names}


@dataclasses.dataclass
class Runs:
    """The model, the examples and every training run of this module, each trained once on demand."""

    root: pathlib.Path
    model_dir: pathlib.Path
    loaded: models.LoadedModel
    model: Llama
    examples: finetune_data.Examples
    done: dict = dataclasses.field(default_factory=dict)
    messages: dict = dataclasses.field(default_factory=dict)

    def train(self, name: str, model_axis: int, config: finetune_step.TrainConfig, on_step=None):
        messages = self.messages.setdefault(name, [])
        return finetune.train(
            self.model,
            self.examples,
            config,
            self.root / name,
            self.loaded.hf_config,
            self.model_dir,
            mesh=sharding.make_mesh(model_axis),
            log=messages.append,
            progress=False,
            on_step=on_step,
        )

    def get(self, model_axis: int, fsdp: str, remat: str = "none") -> finetune.TrainResult:
        """The uninterrupted run on the (8 / model_axis, model_axis) mesh."""
        key = (model_axis, fsdp, remat)
        if key not in self.done:
            name = f"run_{DEVICES // model_axis}x{model_axis}_{fsdp}_{remat}"
            self.done[key] = self.train(name, model_axis, dataclasses.replace(CONFIG, fsdp=fsdp, remat=remat))
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    assert jax.device_count() == DEVICES
    root = tmp_path_factory.mktemp("sharded_finetune")
    model_dir = build_tiny_model_dir(
        root / "model", add_bos=False, heads=8, kv_heads=4, hidden_size=64, intermediate_size=128
    )
    loaded = models.load_model(str(model_dir))
    model = Llama(loaded.config, rngs=nnx.Rngs(0))
    pool = synthetic.generate_pool(24, seed=1)
    records = data.records_from_objects([(f"p[{i}]", o) for i, o in enumerate(pool)], "p")
    examples = finetune_data.tokenize_examples(loaded.tokenizer, records, data.Template(), max_tokens=256)
    return Runs(root, model_dir, loaded, model, examples)


# -- config resolution and validation (no training) ---------------------------------------------


def test_resolved_decides_fsdp_by_memory_and_remat_and_dtype_by_platform():
    base = finetune_step.TrainConfig()
    assert (base.fsdp, base.remat, base.dtype) == ("auto", "auto", "auto")
    limit = 10**9
    budget = memory.PARAM_SHARE * limit
    fits, too_big = math.floor(budget), math.floor(budget) + 1  # <= budget and > budget
    for platform in ("cpu", "gpu", "tpu"):
        assert base.resolved(platform, fits, limit).fsdp == "off"
        assert base.resolved(platform, too_big, limit).fsdp == "on"
        assert base.resolved(platform, 10**15, None).fsdp == "off"  # no known limit: replicated
        # An explicit choice is kept whatever the memory says.
        assert dataclasses.replace(base, fsdp="on").resolved(platform, 1, limit).fsdp == "on"
        assert dataclasses.replace(base, fsdp="off").resolved(platform, 10**15, limit).fsdp == "off"
        assert dataclasses.replace(base, remat="dots").resolved(platform).remat == "dots"
        assert dataclasses.replace(base, dtype="float32").resolved(platform).dtype == "float32"
    assert base.resolved("cpu").remat == "none"
    assert base.resolved("gpu").remat == "full"
    assert base.resolved("tpu").remat == "full"
    assert base.resolved("cpu").dtype == "float32"
    assert base.resolved("gpu").dtype == "bfloat16"
    # Nothing else changes.
    resolved = base.resolved("gpu", too_big, limit)
    assert dataclasses.replace(resolved, fsdp="auto", remat="auto", dtype="auto") == base
    resolved.validate()


def test_bad_fsdp_and_remat_values_are_refused_naming_the_field(runs):
    for field, value in (("fsdp", "maybe"), ("remat", "x")):
        config = dataclasses.replace(CONFIG, **{field: value})
        with pytest.raises(finetune_data.FinetuneError, match=rf"train\.{field}\b.*'{value}'"):
            config.validate()
        with pytest.raises(finetune_data.FinetuneError, match=rf"train\.{field}\b"):
            runs.train(f"bad_{field}", 1, config)
        assert not (runs.root / f"bad_{field}").exists()
    with pytest.raises(finetune_data.FinetuneError, match=r"train\.clip_norm must be > 0"):
        dataclasses.replace(CONFIG, clip_norm=0.0).validate()


def test_batch_rows_must_divide_over_the_data_rows_not_the_devices(runs):
    mesh = sharding.make_mesh(4)  # (2, 4)
    spec = finetune.resolve_run(dataclasses.replace(CONFIG, batch_rows=6), runs.examples, runs.root / "six", mesh)
    assert spec.config.batch_rows == 6  # 6 rows split over 2 data rows although 8 devices do not divide it
    with pytest.raises(finetune_data.FinetuneError, match=r"batch_rows=5.*2 data rows.*use 6"):
        runs.train("five_rows", 4, dataclasses.replace(CONFIG, batch_rows=5))
    assert not (runs.root / "five_rows").exists()


# -- the same parameters on every mesh ------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_and_tensor_parallel_runs_train_the_replicated_parameters(runs):
    replicated = runs.get(1, "off")  # (8, 1): every device holds the whole state
    start = nnx.split(runs.model)[1]
    assert _max_diff(replicated.params, start) > 1e-4  # the steps moved the parameters
    assert [e["step"] for e in replicated.log] == [1, 2, 3, 4]
    variants = {(8, 1): runs.get(1, "on"), (4, 2): runs.get(2, "on"), (1, 8): runs.get(8, "off")}
    for shape, result in variants.items():
        assert _max_diff(result.params, replicated.params) <= 1e-5, shape
        assert [e["examples"] for e in result.log] == [e["examples"] for e in replicated.log]
        np.testing.assert_allclose(
            [e["loss"] for e in result.log], [e["loss"] for e in replicated.log], rtol=1e-5, err_msg=str(shape)
        )
    # The runs really were laid out differently.
    specs = {shape: _named(result.params) for shape, result in variants.items()}
    q = "['layers']['q_proj'].value"
    assert _named(replicated.params)[q].sharding.is_fully_replicated
    assert "data" in specs[(8, 1)][q].sharding.spec
    assert {"data", "model"} <= set(specs[(4, 2)][q].sharding.spec)
    # At model 8 the attention stays whole (4 KV heads), the MLP and the vocabulary split.
    assert specs[(1, 8)][q].sharding.is_fully_replicated
    assert "model" in specs[(1, 8)]["['layers']['gate_proj'].value"].sharding.spec
    assert "model" in specs[(1, 8)]["['embed'].value"].sharding.spec


@pytest.mark.slow
def test_fsdp_splits_parameters_and_adam_moments_over_data(runs):
    result = runs.get(1, "on")
    mesh = sharding.make_mesh(1)
    config = dataclasses.replace(CONFIG, fsdp="on").resolved("cpu")
    params = result.params
    opt_init = finetune_step.make_optimizer(config).init(params)
    shardings = finetune_step.state_shardings(runs.model.config, config, mesh, params, opt_init)
    opt_state = jax.device_put(opt_init, shardings[1])

    named = {f"params{k}": x for k, x in _named(params).items()}
    named |= {f"opt{k}": x for k, x in _named(opt_state).items()}
    moments = [k for k in named if ".mu[" in k or ".nu[" in k]
    assert len(moments) == 2 * len(jax.tree.leaves(params))
    split = 0
    for name, x in named.items():
        shard = x.addressable_shards[0].data
        if x.ndim == 0:
            assert x.sharding.is_fully_replicated, name
        elif max(x.shape) % DEVICES == 0:
            assert shard.nbytes * DEVICES == x.nbytes, name
            split += 1
    # Every parameter and both moments of each have an axis 8 divides, so all of them are split.
    assert split == 3 * len(jax.tree.leaves(params)) == len(moments) + len(jax.tree.leaves(params))

    per_device = sharding.bytes_per_device((params, opt_state), shardings)
    shard_bytes = sum(x.addressable_shards[0].data.nbytes for x in named.values())
    total = sum(x.nbytes for x in named.values())
    scalars = sum(x.nbytes for x in named.values() if x.ndim == 0)
    assert per_device == shard_bytes == (total - scalars) // DEVICES + scalars

    # The compiled step (the one the run used) returns the state in these same layouts.
    compiled, _ = finetune_step.compiled_step(runs.model.config, config, result.row_length, mesh, params, opt_state)
    out_params, out_opt = compiled.output_shardings[0]
    for out, want, tree in ((out_params, shardings[0], params), (out_opt, shardings[1], opt_state)):
        for o, w, x in zip(jax.tree.leaves(out), jax.tree.leaves(want), jax.tree.leaves(tree), strict=True):
            assert o.is_equivalent_to(w, x.ndim), (o, w)


def test_fsdp_never_splits_the_stacked_layer_axis(runs):
    # 1024 stacked layers (abstract: nothing allocated): the layer axis is every layer array's
    # largest, and `data` divides it.
    deep = dataclasses.replace(runs.model.config, num_layers=1024)
    params = nnx.split(nnx.eval_shape(lambda: Llama(deep)))[1]
    config = dataclasses.replace(CONFIG, fsdp="on").resolved("cpu")
    opt_state = jax.eval_shape(finetune_step.make_optimizer(config).init, params)
    for model_axis in (1, 2):
        mesh = sharding.make_mesh(model_axis)
        shardings = finetune_step.state_shardings(deep, config, mesh, params, opt_state)
        leaves = jax.tree_util.tree_flatten_with_path((params, opt_state))[0]
        layer_arrays = 0
        for (path, x), s in zip(leaves, jax.tree.leaves(shardings), strict=True):
            name = jax.tree_util.keystr(path)
            if "['layers']" in name and len(x.shape) > 1:
                assert x.shape[0] == max(x.shape) == 1024
                assert s.spec[0] is None, (name, s.spec)
                assert "data" in s.spec, (name, s.spec)  # split on another axis instead
                layer_arrays += 1
        assert layer_arrays == 3 * len(jax.tree.leaves(params["layers"]))  # params, mu, nu
    # The rule by itself: the largest axis data divides is split, except the stacked one of a layer.
    plan = sharding.ShardPlan.of(deep, 1)
    paths = {jax.tree_util.keystr(p): p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    norm, embed = paths["['layers']['input_norm'].value"], paths["['embed'].value"]
    P = jax.sharding.PartitionSpec
    assert sharding.train_spec(plan, embed, (64, 16, 8), 8, True) == P("data", None, None)
    assert sharding.train_spec(plan, norm, (64, 16, 8), 8, True) == P(None, "data", None)
    assert sharding.train_spec(plan, norm, (64, 16, 8), 8, False) == P(None, None, None)


# -- remat ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_trains_the_same_parameters(runs, remat):
    plain = runs.get(1, "on", "none")
    result = runs.get(1, "on", remat)
    name = f"run_8x1_on_{remat}"
    assert any(f"fsdp on, remat {remat}" in m for m in runs.messages[name])
    # Recomputing a layer reorders a few float sums; AdamW turns that noise on the few near-zero
    # gradients into up to ~1e-6 of parameter (measured 1.3e-6 on one element of 98k): allow 5e-6
    # at most, and on no more than 0.1% of the elements more than 1e-7. A wrong backward pass would
    # move nearly every element by about the learning rate (1e-3).
    assert _max_diff(result.params, plain.params) <= 5e-6
    pairs = zip(_arrays(result.params), _arrays(plain.params), strict=True)
    stray = sum(int((np.abs(a - b) > 1e-7).sum()) for a, b in pairs)
    assert stray <= 1e-3 * sum(x.size for x in _arrays(plain.params))


# -- a killed run resumes on another mesh ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_axis, fsdp, remat",
    [(1, "on", "full"), (8, "off", "none")],
    ids=["to_8x1_fsdp_remat", "to_1x8_tensor_parallel"],
)
def test_killed_run_resumes_on_another_mesh_as_if_uninterrupted(runs, model_axis, fsdp, remat):
    straight = runs.get(2, "on")  # (4, 2) with FSDP, uninterrupted
    name = f"killed_to_{model_axis}_{fsdp}_{remat}"
    with pytest.raises(Killed):
        runs.train(name, 2, dataclasses.replace(CONFIG, fsdp="on"), on_step=_kill_at(3))
    run_dir = runs.root / name
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("ckpt_", ".ckpt_"))) == ["ckpt_000002"]
    saved = run_dir / "ckpt_000002"
    assert {"model.safetensors", "train_state", "trainer_state.json", "config.json"} <= {
        p.name for p in saved.iterdir()
    }
    assert (saved / "train_state").is_dir()
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == 2

    # fsdp and remat are layout only: a run resumes under other values of them.
    resumed = runs.train(name, model_axis, dataclasses.replace(CONFIG, fsdp=fsdp, remat=remat))
    assert (resumed.resumed_from, resumed.steps_run) == (2, 2)
    assert any(f"resuming {run_dir} from step 2" in m for m in runs.messages[name])
    assert _max_diff(resumed.params, straight.params) <= 1e-6
    columns = ("step", "lr", "examples", "tokens", "response_tokens")
    assert _log_columns(run_dir, *columns) == _log_columns(straight.run_dir, *columns)
    assert [e["step"] for e in resumed.log] == [1, 2, 3, 4]

    # The last checkpoint is the model only, and loads back as the run's parameters.
    final = resumed.final_checkpoint
    assert final == run_dir / "ckpt_000004"
    assert not (final / "train_state").exists()
    assert "state_leaves" not in json.loads((final / "trainer_state.json").read_text())
    reloaded = models.load_model(str(final), dtype="float32")
    reloaded_params = nnx.split(reloaded.model)[1]
    assert jax.tree.structure(reloaded_params) == jax.tree.structure(resumed.params)
    for a, b in zip(_arrays(reloaded_params), _arrays(resumed.params), strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
