"""Packing tasks into rows, row groups and prefix buckets."""

import itertools

import numpy as np
import pytest

from nuggets_jax.scoring import packing as packing


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
        for s, task in enumerate(g.tasks):
            if task < 0:
                continue
            mine = g.score_task == s
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


def test_fewest_rows_deals_every_task_into_balanced_rows():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 201, 100).tolist()
    rows = packing.fewest_rows(lengths, 1900)
    assert sorted(itertools.chain(*rows)) == list(range(100))
    sums = [sum(lengths[i] for i in row) for row in rows]
    assert max(sums) <= 1900 and len(rows) >= -(-sum(lengths) // 1900)
    assert packing.deal_rows(lengths, 1900, len(rows) - 1) is None  # the fewest the dealing fills
    assert max(sums) - min(sums) <= max(lengths)
    # Every row holds a like mix of window widths (all rows share one shape of task windows).
    widths = packing.prefix_buckets(lengths, 4)
    counts = np.array([np.bincount([packing.bucket_of(lengths[i], widths) for i in row], minlength=4) for row in rows])
    assert (counts.max(axis=0) - counts.min(axis=0)).max() <= 2
    with pytest.raises(ValueError, match="does not fit"):
        packing.fewest_rows([129], 128)


def test_plan_rows_is_the_shortest_row_for_the_fewest_rows():
    rng = np.random.default_rng(2)
    for tokens_per_row in (256, 700, 2048):
        lengths = rng.integers(5, 250, 60).tolist()
        length = packing.plan_rows(lengths, tokens_per_row)
        n = len(packing.fewest_rows(lengths, max(tokens_per_row, 256)))
        assert length % 16 == 0 and max(lengths) <= length <= max(tokens_per_row, 256)
        assert packing.deal_rows(lengths, length, n) is not None
        shorter = length - 16
        assert shorter < max(lengths) or packing.deal_rows(lengths, shorter, n) is None


def test_plan_rows_rounds_the_row_count_up_to_a_multiple():
    rng = np.random.default_rng(4)
    lengths = rng.integers(20, 201, 100).tolist()
    free = len(packing.fewest_rows(lengths, packing.plan_rows(lengths, 2048)))
    for m in (2, 3, 4):
        length = packing.plan_rows(lengths, 2048, rows_multiple=m)
        rows = packing.fewest_rows(lengths, length)
        assert len(rows) % m == 0 and free <= len(rows) < free + m
        assert length % 16 == 0 and packing.deal_rows(lengths, length - 16, len(rows)) is None
    # Fewer rows than the multiple: left alone (dealing them would leave slots idle anyway).
    assert packing.plan_rows(lengths, 2048, rows_multiple=free + 1) == packing.plan_rows(lengths, 2048)


def test_task_windows_hold_each_task_in_the_narrowest_width():
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 60, 23).tolist()
    ids = [rng.integers(0, 50, n).astype(np.int32) for n in lengths]
    starts = np.ones(len(ids), int)
    widths = [16, 32, 64]
    subset = [0, 5, 6, 11, 17]
    layouts = [
        packing.build_layout(ids, starts, cols, 160, 1, rows=packing.fewest_rows([lengths[c] for c in cols], 160))
        for cols in (range(len(ids)), subset)
    ]
    padded = [packing.pad_layout(lay, 1, 1024, 8) for lay in layouts]
    windowed = packing.add_task_windows(padded, widths)
    shapes = {tuple(w.shape for w in g.window_index) for lay in windowed for g in lay.groups}
    assert len(shapes) == 1  # one compiled program for every group of every layout
    seen = []
    for lay in windowed:
        for g in lay.groups:
            flat = np.concatenate([w.ravel() for w in g.window_index])
            ends = np.cumsum([w.size for w in g.window_index])
            spans = packing.task_spans(g)
            for start, n in spans:
                where = g.window_back[start : start + n]
                # The window holds the task's tokens in order from its first position ...
                assert np.array_equal(flat[where], start + np.arange(n))
                assert np.array_equal(where - where[0], np.arange(n))
                # ... and is the narrowest width that holds it.
                b = int(np.searchsorted(ends, where[0], side="right"))
                assert g.window_index[b].shape[1] == min(w for w in widths if w >= n)
                assert (where[0] - (ends[b - 1] if b else 0)) % g.window_index[b].shape[1] == 0
            seen.append(sorted(n for _, n in spans))
    assert sorted(itertools.chain(*seen[: len(windowed[0].groups)])) == sorted(lengths)
