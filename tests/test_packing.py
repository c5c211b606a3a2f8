"""Packing tasks into rows, row groups and prefix buckets."""

import itertools

import numpy as np
import pytest

from nuggets_jax import packing


def test_pack_rows_fits_and_keeps_every_task():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 57).tolist()
    rows = packing.pack_rows(lengths, 128)
    assert sorted(itertools.chain(*rows)) == list(range(57))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # First-fit decreasing never needs more than 11/9 OPT + 1 rows; OPT >= total / capacity.
    assert len(rows) <= 11 / 9 * np.ceil(sum(lengths) / 128) + 1
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack_rows([129], 128)


def test_layout_reconstructs_every_task():
    rng = np.random.default_rng(1)
    ids = [rng.integers(0, 50, n).astype(np.int32) for n in rng.integers(3, 40, 13)]
    starts = np.array([rng.integers(1, len(t)) for t in ids])
    layout = packing.build_layout(ids, starts, np.arange(13), row_length=64, rows_per_group=2)
    for g in layout.groups:
        r, length = g.tokens.shape
        assert g.shape == layout.groups[0].shape
        for row in range(r):
            for seg in set(g.segment_ids[row].tolist()) - {-1}:
                where = np.flatnonzero(g.segment_ids[row] == seg)
                assert np.array_equal(g.task_positions[row, where], np.arange(len(where)))
                assert np.all(np.diff(where) == 1)  # a task is contiguous inside its row
        for slot, task in enumerate(g.tasks):
            if task < 0:
                continue
            mine = g.score_slot == slot
            # The scored positions predict exactly the response tokens, in order.
            assert np.array_equal(g.score_target[mine], ids[task][starts[task] :])
            flat = g.tokens.reshape(-1)
            assert np.array_equal(flat[g.score_index[mine] + 1], ids[task][starts[task] :])
    assert sorted(t for g in layout.groups for t in g.tasks if t >= 0) == list(range(13))
    assert layout.real_tokens == sum(len(t) for t in ids)
    assert layout.scored_tokens == sum(len(t) - s for t, s in zip(ids, starts, strict=True))


def test_prefix_buckets_minimise_padding_exactly():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 200, 300).tolist()
    widths = packing.prefix_buckets(lengths, max_buckets=3, multiple=16)
    assert len(widths) <= 3 and widths[-1] >= max(lengths)

    def padding(ws):
        return sum(min(w for w in ws if w >= n) - n for n in lengths)

    candidates = sorted({max(16, -(-n // 16) * 16) for n in lengths})
    best = min(
        padding(list(c) + [candidates[-1]]) for k in range(3) for c in itertools.combinations(candidates[:-1], k)
    )
    assert padding(widths) == best
    assert packing.bucket_of(widths[0], widths) == 0
    assert packing.bucket_of(widths[0] + 1, widths) == 1


def test_group_shape_balances_rows_over_fewest_groups():
    for num_rows, per_call in [(1, 8), (8, 8), (9, 8), (17, 8), (5, 0), (100, 7)]:
        groups, rows = packing.group_shape(num_rows, per_call)
        assert groups * rows >= num_rows
        assert rows <= max(1, per_call)
        assert groups == -(-num_rows // max(1, per_call))  # no more groups than needed
        assert groups * (rows - 1) < num_rows  # no group could lose a row


def test_auto_row_length_holds_every_task_and_beats_the_tightest_row():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 300, 200).tolist()
    length = packing.auto_row_length(lengths, tokens_per_call=2048)
    assert length % 64 == 0 and max(lengths) <= length <= 4 * max(lengths)

    def slots(row_length):
        groups, rows = packing.group_shape(len(packing.pack_rows(lengths, row_length)), 2048 // row_length)
        return groups * rows * row_length * (1 + row_length / packing._ATTENTION_LENGTH_SCALE)

    tightest = -(-max(lengths) // 64) * 64
    assert slots(length) <= slots(tightest)
    assert all(slots(length) <= slots(other) for other in range(tightest, 4 * max(lengths) + 1, 64))


def test_row_window_covers_the_longest_task_and_only_when_cheaper():
    for longest in (1, 2, 63, 64, 65, 199, 200, 201):
        for block in (32, 64, 128):
            for row_length in range(64, 1025, 64):
                window = packing.row_window(row_length, longest, block)
                if window is None:
                    continue
                assert window[0] == block and row_length % block == 0 and window[1] % block == 0
                assert window[1] >= longest - 1  # a task's last token sees its first
                assert window[1] < longest - 1 + block  # no whole block more than needed
                assert sum(window) < row_length  # else the whole row is as cheap
    assert packing.row_window(640, 200, 0) is None  # 0 = whole-row attention
    assert packing.row_window(640, 200, 96) is None  # block must divide the row
    assert packing.row_window(256, 200, 64) is None  # 256 + 64 keys: no cheaper than the row


def test_auto_row_length_with_windows_packs_at_least_as_tightly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 201, 100).tolist()

    def fill(row_length):
        groups, rows = packing.group_shape(len(packing.pack_rows(lengths, row_length)), 2048 // row_length)
        return sum(lengths) / (groups * rows * row_length)

    plain = packing.auto_row_length(lengths, 2048)
    windowed = packing.auto_row_length(lengths, 2048, query_block=64)
    # A windowed row's attention does not grow with its length, so longer, tighter rows win.
    assert windowed > plain and fill(windowed) > fill(plain)
