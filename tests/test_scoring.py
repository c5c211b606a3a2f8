"""The scoring engine against whole sequences run through the model, on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from nuggets_jax import data as D
from nuggets_jax import store
from nuggets_jax.models import load_model
from nuggets_jax.scoring import engine as scoring
from nuggets_jax.scoring import one_shot as one_shot
from nuggets_jax.scoring.blocks import blocks_to_run, check_finite, dealt_candidates, first_slots, plan_blocks


@pytest.fixture(scope="module")
def tiny(tiny_bos_model_dir):
    return load_model(str(tiny_bos_model_dir))


def _records(n, offset=0, long_every=0):
    out = []
    for i in range(offset, offset + n):
        extra = " and then some more words to make it long" * (3 if long_every and i % long_every == 0 else 0)
        out.append(
            D.Record(
                str(i), f"Add {i} and 3.{extra}", "" if i % 3 else "x y", f"{i} plus 3 is {i + 3}.", i - offset, {}
            )
        )
    return out


def reference(model, prefix, task, start):
    """Sum of log p and argmax hits of task[start:] after prefix ++ task[:start], one whole sequence."""
    seq = np.concatenate([prefix, task]).astype(np.int32)
    logits = np.asarray(model(jnp.asarray(seq)[None]))[0].astype(np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    pos = np.arange(len(prefix) + start - 1, len(seq) - 1)
    return logp[pos, seq[pos + 1]].sum(), int((logits[pos].argmax(-1) == seq[pos + 1]).sum())


def run(loaded, tasks, prefixes, tmp_path, config=None, mesh=None, name="s"):
    engine = scoring.Engine(
        loaded.model, tasks, scoring.prefix_lengths_of(prefixes), config, mesh=mesh, log=lambda m: None
    )
    zl, zc, _ = engine.zero_shot(prefixes.zero_shot)
    res = one_shot.run_one_shot(
        engine,
        prefixes,
        store.ScoreStore(tmp_path / name),
        [str(i) for i in range(len(prefixes.ids))],
        [str(i) for i in range(len(tasks.ids))],
        chunk_candidates=4,
        progress=False,
    )
    return zl, zc, res.one_logp, res.one_correct


@pytest.mark.parametrize("preset", ["default", "original"])
def test_cached_prefix_equals_whole_sequence(tiny, tmp_path, preset):
    policy = D.TokenPolicy() if preset == "default" else D.TokenPolicy("", False, None, 200)
    tasks = D.tokenize_tasks(tiny.tokenizer, _records(6, 100), D.Template(), policy)
    prefixes = D.tokenize_prefixes(tiny.tokenizer, _records(5, long_every=2), D.Template(), policy)
    assert prefixes.zero_shot.tolist() == ([1] if preset == "default" else [])
    zl, zc, ol, oc = run(tiny, tasks, prefixes, tmp_path)
    for t, (ids, start) in enumerate(zip(tasks.ids, tasks.response_start, strict=True)):
        want = reference(tiny.model, prefixes.zero_shot, ids, start)
        assert zl[t] == pytest.approx(want[0], abs=1e-4) and zc[t] == want[1]
        for c, prefix in enumerate(prefixes.ids):
            want = reference(tiny.model, prefix, ids, start)
            assert ol[c, t] == pytest.approx(want[0], abs=1e-4) and oc[c, t] == want[1]
    # The candidates matter: otherwise this test could not tell prefixes apart.
    assert np.ptp(ol, axis=0).max() > 0.1


def test_padding_bucket_and_device_invariance(tiny, tmp_path):
    tasks = D.tokenize_tasks(tiny.tokenizer, _records(9, 50, long_every=4), D.Template(), D.TokenPolicy())
    prefixes = D.tokenize_prefixes(tiny.tokenizer, _records(11, long_every=3), D.Template(), D.TokenPolicy())
    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    base = run(tiny, tasks, prefixes, tmp_path, scoring.EngineConfig(candidates_per_device=1), mesh=one, name="a")
    variants = [
        (scoring.EngineConfig(), None),  # auto candidates per device, 8 devices
        (scoring.EngineConfig(tokens_per_device=4096, max_prefix_buckets=1), one),  # auto: several per call
        (
            scoring.EngineConfig(tokens_per_device=64, row_length=128, max_prefix_buckets=1, attention_queries=1 << 30),
            None,
        ),
        (scoring.EngineConfig(candidates_per_device=3, max_prefix_buckets=2, lm_head_tokens=16), None),
        (scoring.EngineConfig(candidates_per_device=1, tokens_per_device=256, attention_queries=1), None),  # 8 devices
        (scoring.EngineConfig(candidates_per_device=2), Mesh(np.asarray(jax.devices()[:2]), ("data",))),
    ]
    assert jax.device_count() == 8
    for i, (config, mesh) in enumerate(variants):
        got = run(tiny, tasks, prefixes, tmp_path, config, mesh=mesh, name=f"v{i}")
        for want, have in zip(base, got, strict=True):
            # Different shapes only reorder float32 sums, by how much depends on the CPU's vector code
            # (12 ulps of a sum near 80 on an AMD EPYC): within 16 ulps of the largest sum, or 1e-5.
            ulps = 16 * float(np.spacing(np.float32(np.abs(want).max())))
            np.testing.assert_allclose(have, want, atol=max(1e-5, ulps), rtol=0, err_msg=f"variant {i}")


def test_check_finite_names_candidate_and_task():
    logp = np.zeros((2, 3), np.float32)
    logp[1, 2] = np.nan
    with pytest.raises(scoring.ScoringError, match="candidate 'b' on task 'z'"):
        check_finite(logp, ["a", "b"], ["x", "y", "z"])


def test_subset_layouts_score_only_their_columns(tiny, tmp_path):
    tasks = D.tokenize_tasks(tiny.tokenizer, _records(10, 30, long_every=3), D.Template(), D.TokenPolicy())
    prefixes = D.tokenize_prefixes(tiny.tokenizer, _records(3), D.Template(), D.TokenPolicy())
    subsets = [[0, 4, 7], [1, 2], [9, 3, 5, 8]]
    engine = scoring.Engine(
        tiny.model, tasks, scoring.prefix_lengths_of(prefixes), column_sets=subsets, log=lambda m: None
    )
    assert engine.programs == 3 * len(engine.buckets)  # encode + full step + one shared subset step
    full_logp, full_correct = engine.collect_block(engine.dispatch_block(prefixes.ids[: engine.slots]))
    for cols, layout in zip(subsets, engine.subset_layouts, strict=True):
        logp, correct = engine.collect_block(engine.dispatch_block(prefixes.ids[: engine.slots], layout))
        others = np.setdiff1d(np.arange(10), cols)
        assert np.isnan(logp[:, others]).all()
        real = slice(0, min(engine.slots, 3))
        np.testing.assert_allclose(logp[real][:, cols], full_logp[real][:, cols], atol=1e-5, rtol=1e-6)
        assert np.array_equal(correct[real][:, cols], full_correct[real][:, cols])


def test_plan_blocks_moves_leftovers_up():
    widths = np.asarray([16, 16, 16, 32, 32, 64, 16, 64])
    candidates = [int(i) for i in np.lexsort((np.arange(8), widths))]
    blocks = plan_blocks(candidates, widths, [16, 32, 64], slots=3)
    flat = np.concatenate(blocks)
    assert sorted(flat[flat >= 0].tolist()) == list(range(8))
    assert all((b >= 0).all() for b in blocks[:-1]) and len(blocks) == 3
    # Blocks go up in width: a leftover only ever moves to a wider bucket.
    block_widths = [int(widths[b[b >= 0]].max()) for b in blocks]
    assert block_widths == sorted(block_widths) == [16, 32, 64]


def test_plan_blocks_deals_a_leftover_when_carrying_it_costs_more():
    widths = np.asarray([16, 16, 16, 64, 64, 64, 16])
    order = [int(i) for i in np.lexsort((np.arange(7), widths))]
    # Rows deal evenly (4 groups over 2 slots): a leftover runs at its own width, never carried.
    blocks = plan_blocks(order, widths, [16, 32, 64], slots=2, groups=4, cost=float)
    assert [b.tolist() for b in blocks] == [[0, 1], [2, 6], [3, 4], [5, 5]]
    # 3 groups over 2 slots idle a slot a third of the time: carry when the wider bucket is cheap...
    widths[6] = 32
    cheap = plan_blocks(order, widths, [16, 32, 64], slots=2, groups=3, cost=lambda w: 1 + w / 1000)
    assert [b.tolist() for b in cheap] == [[0, 1], [2, 6], [3, 4], [5, 5]]
    # ... and deal when it is dear.
    dear = plan_blocks(order, widths, [16, 32, 64], slots=2, groups=3, cost=float)
    assert [b.tolist() for b in dear] == [[0, 1], [2, 2], [6, 6], [3, 4], [5, 5]]
    # Several leftovers share a dealt block: slot s holds leftover s % k.
    blocks = plan_blocks(list(range(5)), np.full(5, 16), [16], slots=4, groups=2)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 4, 4, 4]]
    blocks = plan_blocks(list(range(6)), np.full(6, 16), [16], slots=4, groups=2)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 4, 5]]
    assert dealt_candidates(blocks[1]).tolist() == [4, 5]
    assert dealt_candidates(blocks[0]) is None
    assert first_slots(blocks[1]).tolist() == [True, True, False, False]


def test_dealt_block_scores_like_one_candidate_per_slot(tiny):
    tasks = D.tokenize_tasks(tiny.tokenizer, _records(9, 50, long_every=4), D.Template(), D.TokenPolicy())
    prefixes = D.tokenize_prefixes(tiny.tokenizer, _records(3, long_every=2), D.Template(), D.TokenPolicy())
    config = scoring.EngineConfig(row_length=128, max_prefix_buckets=1)
    engine = scoring.Engine(tiny.model, tasks, scoring.prefix_lengths_of(prefixes), config, log=lambda m: None)
    assert len(engine.layout.groups) >= 3 and engine.slots == 8
    want_logp, want_correct = engine.collect_block(engine.dispatch_block(prefixes.ids))
    for k in (1, 2, 3):
        pending = engine.dispatch_dealt(prefixes.ids[:k])
        assert len(pending) == engine.calls_per_block(prefixes.ids[:k])
        logp, correct = engine.collect_dealt(pending, k)
        assert not np.isnan(logp).any()
        np.testing.assert_allclose(logp, want_logp[:k], atol=1e-5, rtol=1e-6)
        assert np.array_equal(correct, want_correct[:k])


def test_resume_replays_the_uninterrupted_block_plan():
    # Two processes: one saved its slots of block 0, the other was killed first. The rest must run
    # in the very blocks of the uninterrupted plan (same widths, same neighbours, same rounding).
    widths = np.asarray([16, 16, 16, 16, 16, 32, 32, 32, 64, 16])
    order = [int(i) for i in np.lexsort((np.arange(10), widths))]
    whole = plan_blocks(order, widths, [16, 32, 64], slots=4)
    done = np.zeros(10, bool)
    done[whole[0][:2]] = True  # half of block 0
    done[whole[1]] = True  # all of block 1
    rest = blocks_to_run(done, widths, [16, 32, 64], slots=4)
    assert [b.tolist() for b in rest] == [whole[0].tolist()] + [b.tolist() for b in whole[2:]]
    assert blocks_to_run(np.ones(10, bool), widths, [16, 32, 64], slots=4) == []


def test_engine_config_auto_sizes_per_platform():
    auto = scoring.EngineConfig()
    cpu, tpu = auto.for_platform("cpu"), auto.for_platform("tpu")
    assert cpu.tokens_per_device < tpu.tokens_per_device
    assert min(cpu.tokens_per_device, cpu.lm_head_tokens, tpu.lm_head_tokens) > 0
    # CPU: vocabulary tiles keep the logits cache-sized; accelerators take the whole vocabulary.
    assert cpu.lm_head_vocab_tile > 0 and tpu.lm_head_vocab_tile == 0
    assert cpu.lm_head_tokens * cpu.lm_head_vocab_tile < tpu.lm_head_tokens * 32000
    # CPU: one task window's scores per attention step; accelerators: every window at once.
    assert 0 < cpu.attention_queries < tpu.attention_queries
    # CPU: causal query blocks narrower than the paper's widest windows; accelerators: whole windows.
    assert 0 < cpu.attention_block < 200 < tpu.attention_block
    fixed = scoring.EngineConfig(
        tokens_per_device=512, lm_head_tokens=64, lm_head_vocab_tile=256, attention_queries=64, attention_block=32
    )
    assert fixed.for_platform("gpu") == fixed  # explicit sizes are kept


def test_auto_candidates_fills_a_call_with_short_tasks():
    short = [30] * 16  # 480 task tokens a candidate: one row of 480
    assert scoring.auto_candidates(short, 2048, candidates=1000, devices=2, buckets=4) == 2048 // 480
    # Never more slots than the pool's share of a prefix bucket.
    assert scoring.auto_candidates(short, 2048, candidates=10, devices=2, buckets=4) == 2
    assert scoring.auto_candidates(short, 2048, candidates=1, devices=8, buckets=4) == 1
    # A candidate whose tasks fill a call (or several) runs alone, as before.
    assert scoring.auto_candidates([150] * 100, 2048, candidates=1000, devices=2, buckets=4) == 1
    assert scoring.auto_candidates([1100], 2048, candidates=1000, devices=1, buckets=1) == 1
    # A bigger budget (GPU/TPU) holds more candidates of the same tasks.
    assert scoring.auto_candidates(short, 16384, candidates=1000, devices=1, buckets=4) == 16384 // 480


def test_auto_candidates_engine_packs_several_candidates_per_device(tiny):
    tasks = D.tokenize_tasks(tiny.tokenizer, _records(4, 10), D.Template(), D.TokenPolicy())
    prefixes = D.tokenize_prefixes(tiny.tokenizer, _records(40), D.Template(), D.TokenPolicy())
    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    engine = scoring.Engine(tiny.model, tasks, scoring.prefix_lengths_of(prefixes), mesh=one, log=lambda m: None)
    lengths = [len(t) for t in tasks.ids]
    expected = scoring.auto_candidates(lengths, 2048, 40, 1, len(engine.buckets))
    assert engine.slots == engine.candidates_per_device == expected > 1
    assert engine.slots * engine.row_length <= 2048
