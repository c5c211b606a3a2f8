"""Model-parallel scoring on a (data, model) mesh: every mesh shape scores like one device, the
parameters are split by the sharding table, nothing compiles after warm-up, argmax ties across
vocabulary shards follow numpy, the shard plan and the memory-aware sizing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nuggets_jax import data as D
from nuggets_jax import sharding
from nuggets_jax.models import load_model
from nuggets_jax.models.config import ModelConfig
from nuggets_jax.models.llama import Llama
from nuggets_jax.scoring import engine as scoring
from nuggets_jax.scoring import memory

from .conftest import build_tiny_model_dir

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]  # (data, model)
# 8 query heads over 4 KV heads, widths and vocabulary divisible by 8: at model=8 the attention
# stays whole (4 KV heads), the MLP and the vocabulary are split.
ARCH = dict(hidden_size=64, intermediate_size=128, heads=8, kv_heads=4)
MODELS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=6),  # shorter than prefix + task
    "qwen2": dict(model_type="qwen2"),  # q/k/v biases
}


def _one_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), sharding.AXES)


def _quiet(_message: str) -> None:
    pass


def _random_tasks(vocab: int, seed: int = 0, count: int = 5) -> D.TokenizedTasks:
    rng = np.random.default_rng(seed)
    ids, starts = [], []
    for _ in range(count):
        n = int(rng.integers(6, 16))
        ids.append(rng.integers(3, vocab, n).astype(np.int32))
        starts.append(int(rng.integers(1, n - 2)))
    starts = np.asarray(starts)
    lengths = np.asarray([len(t) for t in ids])
    return D.TokenizedTasks(ids, starts, lengths - starts, np.zeros(count, bool))


def _random_prefixes(vocab: int, seed: int = 1, count: int = 5, longest: int = 14) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(rng.integers(4, longest + 1))).astype(np.int32) for _ in range(count)]


def _engine(model, tasks, prefixes, mesh, config=None) -> scoring.Engine:
    lengths = [len(p) for p in prefixes] + [1]
    config = config or scoring.EngineConfig(candidates_per_device=1, max_prefix_buckets=2)
    return scoring.Engine(model, tasks, lengths, config, mesh=mesh, log=_quiet)


def _score(engine: scoring.Engine, prefixes: list[np.ndarray]):
    """zero-shot (after a 1-token prefix) and one-shot logp [N, T] / correct [N, T] of every prefix."""
    zero_logp, zero_correct, _ = engine.zero_shot(np.asarray([1], np.int32))
    logp, correct = [], []
    for start in range(0, len(prefixes), engine.slots):
        block = prefixes[start : start + engine.slots]
        block_logp, block_correct = engine.collect_block(engine.dispatch_block(block))
        logp.append(block_logp[: len(block)])
        correct.append(block_correct[: len(block)])
    return zero_logp, zero_correct, np.concatenate(logp), np.concatenate(correct)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {
        name: build_tiny_model_dir(tmp_path_factory.mktemp(name), add_bos=False, seed=3, **ARCH, **extra)
        for name, extra in MODELS.items()
    }


@pytest.fixture(scope="module")
def references(model_dirs):
    """Each model's scores on one device (the data-parallel path every other test trusts)."""
    out = {}
    for name, directory in model_dirs.items():
        loaded = load_model(str(directory))
        vocab = loaded.config.vocab_size
        tasks, prefixes = _random_tasks(vocab), _random_prefixes(vocab)
        engine = _engine(loaded.model, tasks, prefixes, _one_device_mesh())
        out[name] = (tasks, prefixes, _score(engine, prefixes))
    return out


# -- every mesh shape scores like one device ---------------------------------------------------

# Llama on every mesh shape; Mistral (sliding window) and Qwen2 (biases) where attention is split
# over 2 and 4 devices and, for Qwen2, where it stays whole (model=8 > 4 KV heads).
CASES = [("llama", m) for m in MESHES] + [("mistral", (4, 2)), ("mistral", (2, 4)), ("qwen2", (2, 4))]
CASES += [("qwen2", (1, 8))]


@pytest.fixture(scope="module")
def mesh_engine(model_dirs, references):
    """(loaded model, engine) of a model on the mesh with `model` devices per row, built once."""
    cache = {}

    def get(name: str, model: int):
        if (name, model) not in cache:
            tasks, prefixes, _ = references[name]
            mesh = sharding.make_mesh(model)
            loaded = load_model(str(model_dirs[name]), mesh=mesh)
            cache[name, model] = loaded, _engine(loaded.model, tasks, prefixes, mesh)
        return cache[name, model]

    return get


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{d}x{m}" for n, (d, m) in CASES])
def test_every_mesh_scores_like_one_device(references, mesh_engine, name, shape):
    data, model = shape
    tasks, prefixes, want = references[name]
    loaded, engine = mesh_engine(name, model)
    config = loaded.config
    assert config.num_kv_heads == 4 and config.num_heads == 8
    assert config.qkv_bias == (name == "qwen2")
    if name == "mistral":
        assert config.sliding_window < min(len(p) for p in prefixes) + min(len(t) for t in tasks.ids)
    # The candidates matter, or a broken prefix path could still match.
    assert np.ptp(want[2], axis=0).max() > 0.1
    assert engine.mesh.shape == {"data": data, "model": model}
    assert engine.slots == data and engine.plan.degree == model
    if model > 1:
        assert {"mlp", "vocabulary"} <= engine.plan.split
        # At degree 8 the 4 KV heads are replicated to 8 so the attention splits too.
        assert "attention" in engine.plan.split
        assert loaded.model.config.num_kv_heads == max(4, model)
    got = _score(engine, prefixes)
    # Other layouts only reorder float32 sums. These models (weights x8, random biases) amplify that:
    # one device with other batching knobs already moves a sum near 30 by ~5e-5, hence rtol 1e-5.
    for what, have, ref in zip(["zero_logp", "zero_correct", "one_logp", "one_correct"], got, want, strict=True):
        np.testing.assert_allclose(have, ref, atol=1e-5, rtol=1e-5, err_msg=f"{name} mesh {data}x{model} {what}")


# -- the parameters are split, and the engine counts them -------------------------------------


@pytest.mark.parametrize("name,model", [("llama", 2), ("qwen2", 4), ("qwen2", 8)])
def test_split_parameters_take_a_share_per_device(mesh_engine, name, model):
    loaded, engine = mesh_engine(name, model)
    plan = sharding.ShardPlan.of(loaded.model.config, model)  # KV heads replicated to 8 at degree 8
    assert engine.plan == plan
    split_names, shard_bytes = set(), 0
    for path, arr in jax.tree_util.tree_leaves_with_path(engine.state):
        leaf = sharding._leaf_name(path)
        group = sharding.PARAM_RULES.get(leaf, (None, None))[0]
        shard = arr.addressable_shards[0].data
        shard_bytes += shard.nbytes
        if group in plan.split:
            split_names.add(leaf)
            assert shard.nbytes == arr.nbytes // model, leaf
        else:
            assert shard.nbytes == arr.nbytes, leaf
    # Every group splits (at degree 8 over KV heads replicated 4 -> 8).
    expected = {"embed", "lm_head", "gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"}
    expected |= {"q_bias", "k_bias", "v_bias"} if name == "qwen2" else set()
    assert split_names == expected
    assert engine.param_bytes_per_device == shard_bytes
    assert engine.param_bytes_per_device == memory.param_bytes(loaded.config, jnp.float32, model)
    # The loader put every parameter in the engine's layout already: nothing was moved.
    placed = jax.tree.leaves(engine.state)
    assert all(a is b for a, b in zip(jax.tree.leaves(nnx.state(loaded.model)), placed, strict=True))


# -- nothing compiles after warm-up -----------------------------------------------------------


class _CompileCount:
    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_no_compilation_after_warm_up(references, mesh_engine):
    _, prefixes, _ = references["mistral"]
    _, engine = mesh_engine("mistral", 4)
    assert engine.mesh.shape == {"data": 2, "model": 4}
    probe = jnp.arange(5)
    with _CompileCount() as counter:
        _score(engine, prefixes)
        _score(engine, prefixes[::-1])
        engine.collect_block(engine.dispatch_block(prefixes[:1]))  # a block with an empty slot
        scored = counter.count
        jax.jit(lambda x: x * 3 + 1)(probe)  # the counter does see a compilation
    assert scored == 0
    assert counter.count > scored


# -- argmax ties across vocabulary shards -----------------------------------------------------


def _tie_case(tied_embeddings: bool):
    """A Llama whose LM head has planted exact ties; logits are small integers, so exact in float32."""
    vocab, d = 64, 16  # 4 shards of 16
    config = ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=d, intermediate_size=32, num_layers=1,
        num_heads=4, num_kv_heads=4, head_dim=4, tie_word_embeddings=tied_embeddings,
    )  # fmt: skip
    rng = np.random.default_rng(7)
    h = rng.integers(-1, 2, (2, 12, d)).astype(np.float32)  # [C, M, D]
    w = rng.integers(-2, 3, (d, vocab)).astype(np.float32)  # [D, V]
    # (first, later) pairs of equal columns whose logit is the maximum at one position each:
    # across shards (0/2, 1/3, 0/3) and inside one shard (same tile of 4, across tiles).
    pairs = [((0, 0), 3, 40), ((0, 1), 20, 60), ((0, 2), 5, 50), ((1, 0), 17, 18), ((1, 1), 33, 45), ((1, 2), 9, 14)]
    for (c, m), first, later in pairs:
        h[c, m] = 0
        h[c, m, rng.choice(d, 6, replace=False)] = 1  # rows of six ones: the planted logit is 18
        w[:, first] = w[:, later] = 3 * h[c, m]
    logits = np.einsum("cmd,dv->cmv", h.astype(np.float64), w.astype(np.float64))
    for (c, m), first, later in pairs:
        top = np.flatnonzero(logits[c, m] == logits[c, m].max())
        assert top[0] == first and later in top  # the plant holds after the other plants
    targets = rng.integers(0, vocab, (2, 12))
    for i, ((c, m), first, later) in enumerate(pairs):
        targets[c, m] = first if i % 2 else later
    targets[0, 5] = np.argmax(logits[0, 5])  # a few plain hits too
    targets[1, 7] = np.argmax(logits[1, 7])
    model = Llama(config, rngs=nnx.Rngs(0))
    if tied_embeddings:
        model.embed[...] = jnp.asarray(w.T)
    else:
        model.lm_head[...] = jnp.asarray(w)
    return config, model, h, targets.astype(np.int32), logits, pairs


@pytest.mark.parametrize("tied_embeddings", [False, True])
@pytest.mark.parametrize("vocab_tile", [0, 4, 5])  # whole shard; tiles of 4; tiles of 5 + a rest of 1
def test_argmax_ties_across_vocabulary_shards(tied_embeddings, vocab_tile):
    config, model, h, targets, logits, pairs = _tie_case(tied_embeddings)
    mesh = sharding.make_mesh(4)
    plan = sharding.ShardPlan.of(config, 4)
    assert "vocabulary" in plan.split and plan.vocab_shards == 4
    graphdef, state = nnx.split(model)
    shardings = sharding.param_shardings(mesh, plan, state)
    state = jax.device_put(state, shardings)
    vocab_param = "embed" if tied_embeddings else "lm_head"
    assert getattr(state, vocab_param)[...].addressable_shards[0].data.size == config.vocab_size * 16 // 4

    def logprobs(state, h, targets):
        m = nnx.merge(graphdef, state)
        m.vocab_shards = plan.vocab_shards
        return m.token_logprobs(h, targets, lm_chunk=5, lm_head_vocab_tile=vocab_tile)

    data = NamedSharding(mesh, sharding.P("data"))
    run = jax.jit(logprobs, in_shardings=(shardings, data, data), out_shardings=(data, data))
    logp, correct = run(state, jax.device_put(h, data), jax.device_put(targets, data))
    logits32 = logits.astype(np.float32)
    want_correct = np.argmax(logits32, -1) == targets
    np.testing.assert_array_equal(np.asarray(correct), want_correct)
    for i, ((c, m), first, later) in enumerate(pairs):
        assert bool(correct[c, m]) == bool(i % 2), (c, m, first, later)  # the first index wins the tie
    peak = logits.max(-1, keepdims=True)
    log_softmax = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
    want_logp = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-5, rtol=0)


# -- the shard plan -----------------------------------------------------------------------------


def _config(heads, kv_heads, intermediate, vocab) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=4 * heads, intermediate_size=intermediate,
        num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=4,
    )  # fmt: skip


def test_plan_keeps_indivisible_attention_whole_and_says_why():
    config = _config(9, 3, 72, 96)
    plan = sharding.ShardPlan.of(config, 4)
    assert plan.split == {"mlp", "vocabulary"}
    assert set(plan.whole) == {"attention"}
    text = plan.describe()
    assert "attention whole" in text and "query heads 9" in text and "KV heads 3" in text
    assert "not divisible by 4" in text
    assert plan.spec("q_proj") == sharding.P() and plan.spec("o_proj") == sharding.P()
    assert plan.spec("gate_proj") == sharding.PARAM_RULES["gate_proj"][1]
    assert plan.cache_spec() == sharding.P(None, "data")
    assert plan.vocab_shards == 4

    plan3 = sharding.ShardPlan.of(config, 3)
    assert plan3.split == {"attention", "mlp", "vocabulary"} and not plan3.whole
    assert plan3.spec("q_proj") == sharding.PARAM_RULES["q_proj"][1]
    assert plan3.cache_spec() == sharding.CACHE_RULE[1]
    assert plan3.vocab_shards == 3 and "whole" not in plan3.describe()

    # MLP width and vocabulary that do not divide stay whole too; the reason names the width.
    odd = sharding.ShardPlan.of(_config(8, 4, 70, 98), 4)
    assert odd.split == {"attention"}
    assert "MLP width 70" in odd.whole["mlp"] and "vocabulary 98" in odd.whole["vocabulary"]
    assert odd.vocab_shards == 1


def test_make_mesh_needs_a_divisor_of_the_devices():
    assert jax.local_device_count() == 8
    with pytest.raises(sharding.ShardingError, match="mesh.model=3"):
        sharding.make_mesh(3)
    with pytest.raises(sharding.ShardingError):
        sharding.make_mesh(0)


# -- memory-aware sizing ------------------------------------------------------------------------


def test_parameters_that_do_not_fit_name_mesh_model(model_dirs):
    loaded = load_model(str(model_dirs["llama"]))
    config, vocab = loaded.config, loaded.config.vocab_size
    tasks, prefixes = _random_tasks(vocab), _random_prefixes(vocab)
    full = memory.param_bytes(config, jnp.float32, 1)
    # The parameters exceed the program share at model=1 but fit the parameter share when split.
    limit = full / memory.PROGRAM_SHARE * 0.9
    need = min(d for d in (1, 2, 4, 8) if memory.param_bytes(config, jnp.float32, d) <= memory.PARAM_SHARE * limit)
    assert need > 1
    config_in = scoring.EngineConfig(device_memory_gib=limit / 2**30)
    with pytest.raises(scoring.ScoringError, match=f"mesh.model={need}") as error:
        _engine(loaded.model, tasks, prefixes, sharding.make_mesh(1), config_in)
    assert "mesh.model=1" in str(error.value)  # and the degree it was at
    # Nothing fits at a degree of the 8 devices: the sharding error names a higher degree that would,
    # or says that none does (here 8 query heads cannot split 16 ways, so 16 is larger than 8).
    smallest = min(memory.param_bytes(config, jnp.float32, d) for d in (1, 2, 4, 8))
    tiny = smallest * 0.98 / memory.PARAM_SHARE
    budget = memory.PARAM_SHARE * tiny
    needed = next((d for d in (16, 32, 64) if memory.param_bytes(config, jnp.float32, d) <= budget), None)
    config_in = scoring.EngineConfig(device_memory_gib=tiny / 2**30)
    match = rf"mesh.model >= {needed}\b" if needed else "any degree"
    with pytest.raises(sharding.ShardingError, match=match):
        _engine(loaded.model, tasks, prefixes, sharding.make_mesh(1), config_in)


def test_fit_degree_is_the_smallest_divisor_that_fits():
    config = _config(8, 4, 128, 320)
    sizes = {d: memory.param_bytes(config, jnp.float32, d) for d in (1, 2, 4, 8)}
    assert sizes[1] > sizes[2] > sizes[4] > sizes[8]
    assert memory.fit_degree(config, jnp.float32, None, 8) == 1  # limit unknown (CPU)
    for degree in (1, 2, 4, 8):
        limit = int(sizes[degree] / memory.PARAM_SHARE) + 1
        want = min(d for d in (1, 2, 4, 8) if sizes[d] <= memory.PARAM_SHARE * limit)
        assert want == degree
        assert memory.fit_degree(config, jnp.float32, limit, 8) == degree
    # bfloat16 halves every size.
    assert memory.param_bytes(config, jnp.bfloat16, 2) * 2 == sizes[2]
    too_small = int(sizes[8] / memory.PARAM_SHARE) - 64
    budget = memory.PARAM_SHARE * too_small
    needed = next((d for d in (16, 32, 64) if memory.param_bytes(config, jnp.float32, d) <= budget), None)
    match = rf"mesh.model >= {needed}\b" if needed else "any degree"
    with pytest.raises(sharding.ShardingError, match=match):
        memory.fit_degree(config, jnp.float32, too_small, 8)
    with pytest.raises(sharding.ShardingError, match="any degree"):
        memory.fit_degree(config, jnp.float32, 16, 8)


def test_programs_that_do_not_fit_halve_tokens_per_device(model_dirs):
    mesh = sharding.make_mesh(2)
    loaded = load_model(str(model_dirs["llama"]), mesh=mesh)
    vocab = loaded.config.vocab_size
    tasks, prefixes = _random_tasks(vocab, seed=4, count=120), _random_prefixes(vocab, count=4)
    auto = scoring.EngineConfig().for_platform("cpu").tokens_per_device
    # One row of every task at the auto size, two rows (half as long) at half of it.
    assert auto // 2 < sum(len(t) for t in tasks.ids) <= auto
    free = _engine(loaded.model, tasks, prefixes, mesh)
    assert free.config.tokens_per_device == auto and free.memory_limit is None  # CPU reports no limit
    # Room for the parameters and programs of shorter rows, not for the auto-sized ones.
    limit = 0.8 * free.program_bytes / memory.PROGRAM_SHARE
    assert free.param_bytes_per_device < memory.PROGRAM_SHARE * limit
    messages = []
    sized = scoring.Engine(
        loaded.model, tasks, [len(p) for p in prefixes] + [1],
        scoring.EngineConfig(max_prefix_buckets=2, device_memory_gib=limit / 2**30), mesh=mesh, log=messages.append,
    )  # fmt: skip
    assert sized.config.tokens_per_device < auto
    assert sized.program_bytes <= memory.PROGRAM_SHARE * sized.memory_limit
    assert sized.memory_limit == pytest.approx(limit, abs=1)
    assert any("does not fit" in m for m in messages)
    for have, want in zip(_score(sized, prefixes), _score(free, prefixes), strict=True):
        np.testing.assert_allclose(have, want, atol=1e-5, rtol=1e-5)
    # With a fixed tokens_per_device the engine does not resize: it says what to change.
    fixed = scoring.EngineConfig(tokens_per_device=auto, device_memory_gib=limit / 2**30)
    with pytest.raises(scoring.ScoringError, match="tokens_per_device") as error:
        _engine(loaded.model, tasks, prefixes, mesh, fixed)
    assert "mesh.model" in str(error.value)


# -- an abstract model compiles for memory analysis ------------------------------------------


def test_abstract_model_compiles_on_a_model_mesh():
    config = _config(8, 4, 128, 320)
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=jnp.bfloat16))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
    tasks, prefixes = _random_tasks(config.vocab_size), _random_prefixes(config.vocab_size)
    mesh = sharding.make_mesh(4)
    engine = _engine(abstract, tasks, prefixes, mesh)
    assert engine.programs == 2 * len(engine.buckets)
    assert engine.program_bytes > 0
    assert engine.param_bytes_per_device == memory.param_bytes(config, jnp.bfloat16, 4)
    assert engine.param_bytes_per_device < memory.param_bytes(config, jnp.bfloat16, 1)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(engine.state))
    # The abstract state carries the plan's layout.
    embed = engine.state["embed"].get_value()
    assert embed.sharding.shard_shape(embed.shape) == (config.vocab_size // 4, config.hidden_size)
