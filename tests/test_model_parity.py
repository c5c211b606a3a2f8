"""Parity of the NNX Llama family with HF transformers' PyTorch models, float32, tiny random configs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from nuggets_jax.models import attention, llama  # noqa: E402
from nuggets_jax.models.params import load_params  # noqa: E402
from nuggets_jax.scoring import packing  # noqa: E402

VOCAB = 97
TOL = 1e-4
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _hf_config(kind: str):
    if kind == "llama_tied":
        return transformers.LlamaConfig(**_COMMON, tie_word_embeddings=True), transformers.LlamaForCausalLM
    if kind == "llama3_untied":
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )
        config = transformers.LlamaConfig(**_COMMON, rope_parameters=rope, tie_word_embeddings=False)
        return config, transformers.LlamaForCausalLM
    if kind == "mistral_window":
        # A window shorter than the sequences, so it cuts attention inside the prefix path too.
        config = transformers.MistralConfig(**_COMMON, sliding_window=7, tie_word_embeddings=False)
        return config, transformers.MistralForCausalLM
    if kind == "qwen2_bias":
        return transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True), transformers.Qwen2ForCausalLM
    raise ValueError(kind)


@pytest.fixture(scope="module", params=["llama_tied", "llama3_untied", "mistral_window", "qwen2_bias"])
def pair(request, tmp_path_factory):
    """(HF torch model, our model loaded from its saved checkpoint)."""
    torch.manual_seed(0)
    config, cls = _hf_config(request.param)
    config._attn_implementation = "eager"
    hf = cls(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # HF zero-inits biases and ones-inits norms: make every weight matter
            p.add_(torch.randn_like(p) * 0.05)
    model_dir = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(model_dir)
    ours = load_params(model_dir)
    if request.param == "qwen2_bias":
        assert ours.config.qkv_bias
    assert ours.config.tie_word_embeddings == config.tie_word_embeddings
    return hf, ours


def _hf_logits(hf, ids, mask=None, positions=None) -> np.ndarray:
    kwargs = {"input_ids": torch.as_tensor(np.asarray(ids))}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(mask, np.int64))
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions, np.int64))
    with torch.no_grad():
        return hf(**kwargs).logits.float().numpy()


def _random_ids(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def test_right_padding(pair):
    hf, ours = pair
    ids = _random_ids(1, (3, 20))
    lengths = np.array([20, 14, 5])
    mask = np.arange(20)[None] < lengths[:, None]
    ref = _hf_logits(hf, ids, mask)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[mask], ref[mask], atol=TOL, rtol=0)


def test_left_padding_with_positions(pair):
    hf, ours = pair
    ids = _random_ids(2, (3, 18))
    lengths = np.array([18, 11, 4])
    mask = np.arange(18)[None] >= (18 - lengths)[:, None]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = _hf_logits(hf, ids, mask, positions)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
    np.testing.assert_allclose(got[mask], ref[mask], atol=TOL, rtol=0)
    # Left padding with positions is the same computation as the unpadded sequence.
    for b in range(3):
        alone = np.asarray(ours(jnp.asarray(ids[b : b + 1, 18 - lengths[b] :])))[0]
        np.testing.assert_allclose(got[b, 18 - lengths[b] :], alone, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "attention_queries, attention_block",
    [(None, 0), (0, 0), (4, 0), (4, 3)],
    ids=["whole_row", "windows_at_once", "window_steps", "causal_blocks"],
)
def test_prefix_cache_and_packed_rows_equal_whole_sequences(pair, attention_queries, attention_block):
    hf, ours = pair
    prefix_lengths = [5, 9]
    width = 10  # both prefixes right-padded to one width
    prefixes = [_random_ids(10 + c, n) for c, n in enumerate(prefix_lengths)]
    tokens = np.zeros((2, width), np.int32)
    prefix_mask = np.zeros((2, width), bool)
    for c, p in enumerate(prefixes):
        tokens[c, : len(p)] = p
        prefix_mask[c, : len(p)] = True
    cache = ours.encode_prefix(jnp.asarray(tokens), jnp.asarray(prefix_mask))

    # One row, three tasks packed back to back, then padding. Task windows of widths 4 and 8: the
    # 7-token task's window reaches into the next task, the last task's window is clipped at the row end.
    tasks = [_random_ids(20, 4), _random_ids(21, 7), _random_ids(22, 3)]
    row_len = 14
    layout = packing.build_layout(tasks, np.ones(3, int), [0, 1, 2], row_len, 1, rows=[[0, 1, 2]])
    group = packing.add_task_windows([layout], [4, 8])[0].groups[0]
    assert [w.shape for w in group.window_index] == [(2, 4), (1, 8)]
    spans = packing.task_spans(group)
    windows = None
    if attention_queries is not None:
        windows = attention.TaskWindows(
            tuple(jnp.asarray(w) for w in group.window_index),
            jnp.asarray(group.window_back),
            attention_queries,
            attention_block,  # blocks of 2 and 2 in the 4-wide windows, 3, 3 and 2 in the 8-wide one
        )
    row_arrays = (jnp.asarray(a) for a in (group.tokens, group.task_positions, group.segment_ids))  # each [R=1, L]
    h = ours.forward_rows(cache, *row_arrays, windows)
    assert h.shape == (2, 1, row_len, 64)
    logits = np.asarray(ours.logits(h))  # [C, R, L, V]
    for c, prefix in enumerate(prefixes):
        for (start, n), task in zip(spans, tasks, strict=True):
            whole = np.concatenate([prefix, task])[None]
            ref = _hf_logits(hf, whole)[0, len(prefix) :]
            np.testing.assert_allclose(logits[c, 0, start : start + n], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("vocab_tile", [0, 7, 97], ids=["whole_vocab", "tiles_of_7", "one_tile"])
def test_token_logprobs_and_correct(pair, vocab_tile):
    hf, ours = pair
    ids = _random_ids(3, (2, 16))
    ref = _hf_logits(hf, ids)
    h = np.asarray(ours.hidden(jnp.asarray(ids)))  # [B, L, D]
    flat_h = h[:, :-1].reshape(-1, h.shape[-1])
    flat_ref = ref[:, :-1].reshape(-1, VOCAB)
    # Half the targets are the reference argmax, so `correct` is exercised both ways.
    targets = ids[:, 1:].reshape(-1).copy()
    targets[::2] = flat_ref.argmax(-1)[::2]
    logp, correct = ours.token_logprobs(
        jnp.asarray(flat_h), jnp.asarray(targets), lm_chunk=7, lm_head_vocab_tile=vocab_tile
    )
    ref_logp = torch.log_softmax(torch.as_tensor(flat_ref), dim=-1).numpy()[np.arange(len(targets)), targets]
    np.testing.assert_allclose(np.asarray(logp), ref_logp, atol=TOL, rtol=0)
    top2 = np.sort(flat_ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3  # argmax is only well defined away from near-ties
    assert clear.mean() > 0.9
    expected = flat_ref.argmax(-1) == targets
    np.testing.assert_array_equal(np.asarray(correct)[clear], expected[clear])
    assert expected.any() and not expected.all()


@pytest.mark.parametrize("vocab_tile", [0, 7], ids=["whole_vocab", "tiles_of_7"])
def test_correct_breaks_exact_ties_like_argmax(pair, vocab_tile):
    _, ours = pair
    # Zero hidden states give all-equal logits: argmax (and so `correct`) picks token 0, also when
    # the tie spans vocabulary tiles.
    targets = jnp.asarray([0, 1, 0, VOCAB - 1, 7])
    logp, correct = jax.jit(lambda h, t: ours.token_logprobs(h, t, lm_chunk=2, lm_head_vocab_tile=vocab_tile))(
        jnp.zeros((5, ours.config.hidden_size)), targets
    )
    np.testing.assert_array_equal(np.asarray(correct), [True, False, True, False, False])
    np.testing.assert_allclose(np.asarray(logp), -np.log(VOCAB), rtol=1e-6)


def test_correct_follows_argmax_on_ties_inside_and_across_tiles(pair):
    # A head whose rows 3, 5 and 10 are equal (and 8, 12): logits tie exactly inside a vocabulary
    # tile of 7 (3 and 5; 8 and 12) and across tiles (3 and 10). `correct` must follow argmax.
    _, ours = pair
    model = llama.Llama(ours.config, rngs=nnx.Rngs(5))
    head = model.embed if model.lm_head is None else model.lm_head
    w = np.array(head[...])
    rows = w if model.lm_head is None else w.T  # [V, D]
    rows[[5, 10]] = rows[3]
    rows[12] = rows[8]
    head[...] = jnp.asarray(w)
    h = jnp.asarray(np.stack([rows[3], rows[8], rows[3], rows[8]]) * 50.0)
    logits = np.asarray(model.logits(h))
    top = logits.max(axis=-1, keepdims=True)
    assert ((logits == top).sum(axis=-1) > 1).all()  # every row has a tied maximum
    for target in (3, 5, 10, 8, 12, 0):
        targets = jnp.full((4,), target)
        for vocab_tile in (0, 7):
            _, correct = model.token_logprobs(h, targets, lm_chunk=3, lm_head_vocab_tile=vocab_tile)
            np.testing.assert_array_equal(np.asarray(correct), logits.argmax(-1) == target, err_msg=f"{vocab_tile}")


def test_jit_matches_eager(pair):
    _, ours = pair
    ids = jnp.asarray(_random_ids(4, (2, 12)))
    eager = np.asarray(ours(ids))
    graphdef, state = nnx.split(ours)
    jitted = np.asarray(jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))(state, ids))
    np.testing.assert_allclose(jitted, eager, atol=TOL, rtol=0)
