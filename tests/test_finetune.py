"""Fine-tuning: exact response spans, response-only loss, accumulation, checkpoints and exact resume."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nuggets_jax import data, models
from nuggets_jax.finetune import checkpoint as checkpoint
from nuggets_jax.finetune import data as finetune_data
from nuggets_jax.finetune import step as finetune_step
from nuggets_jax.finetune import train as finetune
from nuggets_jax.models.params import load_params

OBJECTS = [
    {"instruction": "Add 2 and 3.", "output": "2 plus 3 is 5."},
    {"instruction": "Convert 4 km to metres.", "input": "4 km", "output": "4 km is 4000 metres."},
    {"instruction": "Reverse the word apple.", "output": "The reversed word is elppa."},
    {"instruction": "Name the capital of France.", "output": "Paris is the capital of France."},
    {"instruction": "Sort these words alphabetically.", "input": "fox dog", "output": "dog fox"},
    {"instruction": "What jumps over the lazy dog?", "output": "The quick brown fox."},
]


# Rows of example indices that fit 64 tokens with the tiny tokenizer (lengths 27, 34, 30, 46, 47, 47).
ROWS = [[0, 1], [2], [3], [4], [5], []]


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _loss(graphdef, state, micro, normalizer):
    return finetune_step.response_loss(nnx.merge(graphdef, state), micro, normalizer, 16)


def logits_of(model, tokens) -> np.ndarray:
    return np.asarray(_logits(*nnx.split(model), jnp.asarray(tokens)))


def loss_of(model, micro, normalizer) -> float:
    return float(_loss(*nnx.split(model), micro, jnp.float32(normalizer)))


def _records():
    return data.records_from_objects([(f"test[{i}]", o) for i, o in enumerate(OBJECTS)], "test")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def examples(tiny):
    return finetune_data.tokenize_examples(tiny.tokenizer, _records(), data.Template(), max_tokens=64)


def _direct_response_nll(model, examples) -> list[np.ndarray]:
    """Per example: -log p of its response tokens from the plain full-sequence forward (each example
    its own right-padded row, no packing), log-softmax in float64."""
    width = int(examples.lengths.max())
    tokens = np.zeros((len(examples.ids), width), np.int32)
    for i, ids in enumerate(examples.ids):
        tokens[i, : len(ids)] = ids
    # Right padding: causal attention keeps it out of every real position.
    logits = logits_of(model, tokens).astype(np.float64)  # [E, W, V]
    peak = logits.max(-1, keepdims=True)
    logp = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
    return [
        np.asarray([-logp[i, p - 1, ids[p]] for p in range(int(examples.response_start[i]), len(ids))])
        for i, ids in enumerate(examples.ids)
    ]


def test_examples_are_prompt_then_exact_response_then_eos(tiny, tiny_bos_model_dir):
    template = data.Template()
    for tok, lead in (
        (tiny.tokenizer, []),
        (models.load_model(str(tiny_bos_model_dir)).tokenizer, [1]),
    ):
        ex = finetune_data.tokenize_examples(tok, _records(), template, max_tokens=64)
        for record, ids, start in zip(_records(), ex.ids, ex.response_start, strict=True):
            prompt = tok(template.prompt(record), add_special_tokens=False)["input_ids"]
            response = tok(record.output, add_special_tokens=False)["input_ids"]
            assert ids.tolist() == lead + prompt + response + [tok.eos_token_id]
            assert ids[start:-1].tolist() == response
    # A cut example keeps max_tokens tokens, at least one of the response, and no eos.
    tok = tiny.tokenizer
    full = finetune_data.tokenize_examples(tok, _records(), template, max_tokens=64, eos=False)
    limit = int(full.response_start.max()) + 1
    cut = finetune_data.tokenize_examples(tok, _records(), template, max_tokens=limit)
    assert any(len(x) > limit for x in full.ids)
    for short, long in zip(cut.ids, full.ids, strict=True):
        if len(long) + 1 > limit:
            assert short.tolist() == long[:limit].tolist()
        else:
            assert short.tolist() == [*long.tolist(), tok.eos_token_id]
    with pytest.raises(data.DataError, match="keep no response token within train.max_tokens"):
        finetune_data.tokenize_examples(tok, _records(), template, max_tokens=int(full.response_start.min()))
    # With a list for them, those records are left out and named; the others are as before.
    limit = int(np.median(full.response_start)) + 1
    left_out = []
    kept = finetune_data.tokenize_examples(tok, _records(), template, limit, eos=False, untrainable=left_out)
    fits = np.flatnonzero(full.response_start < limit)
    assert 0 < len(fits) < len(full.ids)
    assert left_out == [full.record_ids[i] for i in range(len(full.ids)) if i not in fits]
    assert kept.record_ids == [full.record_ids[i] for i in fits]
    np.testing.assert_array_equal(kept.response_start, full.response_start[fits])
    assert [x.tolist() for x in kept.ids] == [full.ids[i][:limit].tolist() for i in fits]


def test_data_order_packs_the_stream_in_order_and_visits_every_example_once_per_epoch():
    lengths = [5, 9, 3, 7, 12, 4, 6]
    n, row_length = len(lengths), 16
    order = finetune_data.DataOrder(lengths, seed=3, batch_rows=2, row_length=row_length, micro_batches=2)
    stream = finetune_data.DataOrder(lengths, seed=3, batch_rows=2, row_length=row_length, micro_batches=2)
    steps = [order.next_step() for _ in range(6)]
    position = 0
    for step in steps:
        assert len(step) == 2
        for micro in step:
            assert len(micro) == 2
            taken = sorted(e for row in micro for e in row)
            assert taken == sorted(stream.example_at(position + i) for i in range(len(taken)))
            position += len(taken)
            # The micro-batch ended because the next example of the stream fits none of its rows.
            assert all(
                row_length - sum(lengths[e] for e in row) < lengths[stream.example_at(position)] for row in micro
            )
    assert position == order.position and position >= 2 * n
    epochs = [[stream.example_at(e * n + i) for i in range(n)] for e in range(position // n)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # a fresh permutation per epoch
    replay = finetune_data.DataOrder(lengths, seed=3, batch_rows=2, row_length=row_length, micro_batches=2)
    replay.skip(4)
    assert replay.next_step() == steps[4]


def test_loss_is_cross_entropy_of_response_tokens_only(tiny, examples):
    batch = finetune_data.make_batch(examples, [ROWS], batch_rows=6, row_length=64)
    micro = {f: jnp.asarray(getattr(batch, f)[0]) for f in ("tokens", "positions", "segment_ids", "targets")}
    micro["weights"] = jnp.asarray(batch.weights[0])
    loss = loss_of(tiny.model, micro, batch.response_tokens)
    per_token = np.concatenate(_direct_response_nll(tiny.model, examples))
    assert batch.response_tokens == per_token.size
    np.testing.assert_allclose(loss, per_token.mean(), rtol=2e-5)

    # A different target where the prompt is predicted changes nothing; one in the response does.
    prompt_position = int(np.flatnonzero((batch.weights[0, 0] == 0) & (batch.segment_ids[0, 0] == 0))[1])
    response_position = int(np.flatnonzero(batch.weights[0, 0])[0])
    for position, should_change in ((prompt_position, False), (response_position, True)):
        changed = dict(micro)
        changed["targets"] = micro["targets"].at[0, position].set((micro["targets"][0, position] + 7) % 300)
        other = loss_of(tiny.model, changed, batch.response_tokens)
        assert (other != loss) == should_change


def test_gradient_accumulation_equals_one_batch_of_k_times_the_size(tiny, examples):
    one = finetune_data.make_batch(examples, [ROWS], batch_rows=6, row_length=64)  # [1, 6, L]
    two = finetune_data.make_batch(examples, [ROWS[:3], ROWS[3:]], batch_rows=3, row_length=64)  # [2, 3, L]
    assert one.response_tokens == two.response_tokens
    graphdef, params = nnx.split(tiny.model)
    grads_of = jax.jit(lambda p, b, z: finetune_step.step_gradients(graphdef, 16, jnp.float32, p, b, z))

    def arrays(batch):
        return {f: jnp.asarray(getattr(batch, f)) for f in ("tokens", "positions", "segment_ids", "targets", "weights")}

    z = jnp.float32(one.response_tokens)
    g1, l1 = grads_of(params, arrays(one), z)
    g2, l2 = grads_of(params, arrays(two), z)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1)) > 1e-3  # not all zero


def test_learning_rate_schedule_is_linear_warmup_then_cosine():
    config = finetune_step.TrainConfig(steps=12, warmup_steps=3, learning_rate=1e-3, end_learning_rate=0.1)
    schedule = finetune_step.learning_rate_schedule(config)
    for count in range(12):
        if count < 3:
            want = 1e-3 * (count + 1) / 3
        else:
            progress = (count - 3) / (12 - 3 - 1)
            want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(schedule(count)) == pytest.approx(want, rel=1e-5)
    assert float(schedule(11)) == pytest.approx(1e-4, rel=1e-5)


TRAIN = finetune_step.TrainConfig(
    steps=4, batch_rows=8, learning_rate=1e-2, warmup_steps=1, checkpoint_every=2, keep_checkpoints=3, seed=1
)


@pytest.fixture(scope="module")
def straight(tiny, examples, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    result = finetune.train(tiny.model, examples, TRAIN, run_dir, tiny.hf_config, tiny.model_dir, progress=False)
    return result


def _all_examples_loss(model, examples) -> float:
    batch = finetune_data.make_batch(examples, [ROWS], batch_rows=6, row_length=64)
    micro = {f: jnp.asarray(getattr(batch, f)[0]) for f in ("tokens", "positions", "segment_ids", "targets", "weights")}
    return loss_of(model, micro, batch.response_tokens)


def test_loss_decreases_on_a_tiny_dataset(tiny, examples, straight):
    before = _all_examples_loss(tiny.model, examples)
    after = _all_examples_loss(finetune_step.merge_params(tiny.model, straight.params), examples)
    assert after < 0.8 * before
    assert [e["step"] for e in straight.log] == [1, 2, 3, 4]


def test_checkpoint_loads_back_with_the_same_logits(tiny, tiny_model_dir, examples, straight):
    tokens = examples.ids[1][None]
    trained = logits_of(finetune_step.merge_params(tiny.model, straight.params), tokens)
    np.testing.assert_array_equal(logits_of(load_params(straight.final_checkpoint), tokens), trained)
    # A HF directory with the tokenizer: load_model takes it as it is.
    again = models.load_model(str(straight.final_checkpoint))
    assert again.tokenizer("Add 2 and 3.")["input_ids"] == tiny.tokenizer("Add 2 and 3.")["input_ids"]
    # Training did not touch the caller's model.
    original = logits_of(tiny.model, tokens)
    np.testing.assert_array_equal(original, logits_of(load_params(tiny_model_dir), tokens))
    assert not np.allclose(trained, original)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_continues_the_same_schedule(tiny, examples, straight, tmp_path):
    def kill_at_3(step, entry):
        if step == 3:  # step 3 ran but its checkpoint (at 4) was never written
            raise _Killed

    with pytest.raises(_Killed):
        finetune.train(
            tiny.model, examples, TRAIN, tmp_path, tiny.hf_config, tiny.model_dir, progress=False, on_step=kill_at_3
        )
    assert [s for s, _ in checkpoint.checkpoint_dirs(tmp_path)] == [2]
    resumed = finetune.train(tiny.model, examples, TRAIN, tmp_path, tiny.hf_config, tiny.model_dir, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps_run == 2
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    assert [e["lr"] for e in logged] == [e["lr"] for e in straight.log]
    assert [e["examples"] for e in logged] == [e["examples"] for e in straight.log]
    assert len({e["lr"] for e in logged}) > 1

    # A changed setting is refused (before anything is compiled or overwritten).
    changed = dataclasses.replace(TRAIN, learning_rate=2e-2)
    with pytest.raises(finetune_data.FinetuneError, match="different run"):
        finetune.train(tiny.model, examples, changed, tmp_path, tiny.hf_config, progress=False)


def test_bad_batch_rows_is_refused_with_the_fix(tiny, examples, tmp_path):
    config = finetune_step.TrainConfig(steps=1, batch_rows=6)
    with pytest.raises(finetune_data.FinetuneError, match="multiple of the 8 devices; use 8"):
        finetune.train(tiny.model, examples, config, tmp_path, tiny.hf_config, progress=False)
