"""Static shapes: task rows (several tasks packed per row), row groups and prefix buckets.

The task set is the same for every candidate, so its layout is built once: tasks are packed into
rows of `row_length` tokens (a task never spans two rows; the scoring engine deals them in snake
order, `plan_rows`, first-fit decreasing is the default), and rows are cut into groups of
`rows_per_group`, one group per device call. Every group has the same shapes,
so one compiled program serves all of them. Only the positions that predict a response token go
through the LM head: `score_index` lists them, padded to a static count.

Attention runs in task windows (`add_task_windows`): every task is gathered from its group's
flattened rows into a window of the narrowest of a few widths that holds it, so a query attends
only to its own task's keys (and the candidate's prefix) instead of a whole packed row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from nuggets_jax import data as data_lib


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """One device call's task rows. R rows, L tokens a row, M scored positions, S tasks."""

    tokens: np.ndarray  # [R, L] int32
    task_positions: np.ndarray  # [R, L] int32: position inside its task
    segment_ids: np.ndarray  # [R, L] int32: index of its task inside the row, -1 = padding
    score_index: np.ndarray  # [M] int32: flat index (r * L + l) of a position predicting a response token
    score_target: np.ndarray  # [M] int32: the response token it predicts
    score_task: np.ndarray  # [M] int32: the group's task in [0, S) it counts for, S = padding
    tasks: np.ndarray  # [S] int32: task column of each of the group's tasks, -1 = unused
    # Task windows (`add_task_windows`), one array per window width W: [n_W, W] flat indices (r * L + l)
    # of each window's tokens, a task's first token first; unused windows and tails are don't-care.
    window_index: tuple[np.ndarray, ...] = ()
    window_back: np.ndarray | None = None  # [R * L] int32: each token's place in the concatenated windows

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (*self.tokens.shape, self.score_index.shape[0], self.tasks.shape[0])

    @property
    def program_shape(self) -> tuple:
        """Everything that picks a compiled program: the shape and the window shapes."""
        return (*self.shape, tuple(w.shape for w in self.window_index))


@dataclasses.dataclass(frozen=True)
class TaskLayout:
    """All row groups of a task set (or of a subset of its columns)."""

    groups: list[RowGroup]
    row_length: int
    real_tokens: int  # task tokens, no padding
    scored_tokens: int  # response tokens scored

    @property
    def padded_tokens(self) -> int:
        """Task tokens computed per candidate, padding included."""
        return len(self.groups) * self.groups[0].tokens.size

    @property
    def fill(self) -> float:
        return self.real_tokens / self.padded_tokens


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: lists of task indices whose lengths fit `row_length` together.

    Deterministic: ties in length keep index order, rows keep creation order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > row_length:
            raise ValueError(f"task of {n} tokens does not fit a row of {row_length}")
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(row_length - n)
    return rows


def deal_rows(lengths: Sequence[int], row_length: int, num_rows: int) -> list[list[int]] | None:
    """Deals the tasks, longest first, over `num_rows` rows in snake order; None if they do not fit.

    Every row gets a like mix of long and short tasks (and about the same number of tokens), which
    task windows need: all rows share one shape of windows, so a row holding many more tasks of one
    width than the others would make every row compute that many windows. A task that does not fit
    its turn's row goes to the row with the most room. Deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    free = [row_length] * num_rows
    for k, i in enumerate(order):
        lap, turn = divmod(k, num_rows)
        r = turn if lap % 2 == 0 else num_rows - 1 - turn
        if lengths[i] > free[r]:
            r = max(range(num_rows), key=lambda j: (free[j], -j))
            if lengths[i] > free[r]:
                return None
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def fewest_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """`deal_rows` into the fewest rows of `row_length` tokens it fills."""
    if max(lengths) > row_length:
        raise ValueError(f"task of {max(lengths)} tokens does not fit a row of {row_length}")
    for n in range(math.ceil(sum(lengths) / row_length), len(lengths) + 1):
        rows = deal_rows(lengths, row_length, n)
        if rows is not None:
            return rows
    raise AssertionError("unreachable: one task a row always fits")


def plan_rows(lengths: Sequence[int], tokens_per_row: int, multiple: int = 16, rows_multiple: int = 1) -> int:
    """The row length for these tasks: as few rows of at most `tokens_per_row` tokens as `deal_rows`
    fills (longer if the longest task needs it), each as short as the dealing allows, a multiple of
    `multiple`. The row length costs nothing in attention, which runs in task windows.

    With `rows_multiple` m, a row count of at least m is rounded up to a multiple of m (shorter
    rows), so one candidate's rows can be dealt evenly over m devices (`blocks.plan_blocks`).
    """
    longest, total = max(lengths), sum(lengths)
    cap = max(tokens_per_row, math.ceil(longest / multiple) * multiple)
    n = len(fewest_rows(lengths, cap))
    if rows_multiple > 1 and n >= rows_multiple:
        n = min(len(lengths), -(-n // rows_multiple) * rows_multiple)
    shortest = max(math.ceil(longest / multiple), math.ceil(total / n / multiple)) * multiple
    shorter = (length for length in range(shortest, cap, multiple) if deal_rows(lengths, length, n) is not None)
    return next(shorter, cap)  # `cap` itself fits n rows


def scored_masks(task_ids: Sequence[np.ndarray], scored) -> list[np.ndarray]:
    """Per-task bool masks of the scored tokens; `scored` is such masks, or [T] first response
    tokens (one span to the end)."""
    if len(scored) and np.ndim(scored[0]) == 0:
        return data_lib.span_masks(task_ids, scored)
    return [np.asarray(m, bool) for m in scored]


def build_layout(
    task_ids: Sequence[np.ndarray],
    scored: Sequence[np.ndarray] | np.ndarray,
    columns: Sequence[int] | np.ndarray,
    row_length: int,
    rows_per_group: int,
    score_multiple: int = 64,
    rows: Sequence[Sequence[int]] | None = None,
) -> TaskLayout:
    """Packs the tasks `columns` (indices into `task_ids`) into row groups of identical shape.

    Args:
      task_ids: every task's ids (prompt ++ response after the cut).
      scored: per task a bool mask of its scored tokens (the first is never scored), or [T] first
        response tokens.
      columns: which tasks to lay out (all of them, or a subset for adaptive rounds).
      row_length: L; at least the longest task.
      rows_per_group: R rows per device call.
      score_multiple: M is rounded up to a multiple of this.
      rows: the packing (lists of positions in `columns`); default `pack_rows` (first-fit decreasing).
    """
    columns = [int(c) for c in columns]
    lengths = [len(task_ids[c]) for c in columns]
    masks = scored_masks(task_ids, scored)
    # Position p predicts token p + 1, so a scored token p is read at p - 1.
    where = {c: np.flatnonzero(masks[c]) for c in set(columns)}
    if any(w.size and w[0] == 0 for w in where.values()):
        raise ValueError("the first token of a task cannot be scored: nothing predicts it")
    rows = pack_rows(lengths, row_length) if rows is None else rows
    n_groups = max(1, math.ceil(len(rows) / rows_per_group))
    grouped = [rows[g * rows_per_group : (g + 1) * rows_per_group] for g in range(n_groups)]
    max_tasks = max(sum(len(row) for row in group) for group in grouped)
    max_scored = max(sum(where[columns[i]].size for row in group for i in row) for group in grouped)
    m = max(score_multiple, math.ceil(max_scored / score_multiple) * score_multiple)
    groups = []
    for group in grouped:
        tokens = np.zeros((rows_per_group, row_length), np.int32)
        positions = np.zeros((rows_per_group, row_length), np.int32)
        segments = np.full((rows_per_group, row_length), -1, np.int32)
        index = np.zeros(m, np.int32)
        target = np.zeros(m, np.int32)
        task_of = np.full(m, max_tasks, np.int32)
        tasks = np.full(max_tasks, -1, np.int32)
        task = filled = 0
        for r, row in enumerate(group):
            offset = 0
            for seg, i in enumerate(row):
                ids = task_ids[columns[i]]
                n, at = len(ids), where[columns[i]]
                tokens[r, offset : offset + n] = ids
                positions[r, offset : offset + n] = np.arange(n)
                segments[r, offset : offset + n] = seg
                k = at.size
                index[filled : filled + k] = r * row_length + offset + at - 1
                target[filled : filled + k] = ids[at]
                task_of[filled : filled + k] = task
                tasks[task] = columns[i]
                filled += k
                task += 1
                offset += n
        groups.append(RowGroup(tokens, positions, segments, index, target, task_of, tasks))
    real = sum(lengths)
    scored_total = sum(where[c].size for c in columns)
    return TaskLayout(groups, row_length, real, scored_total)


def prefix_buckets(lengths: Sequence[int], max_buckets: int = 4, multiple: int = 16) -> list[int]:
    """Bucket widths (ascending) that minimise total padding of the prefixes, at most `max_buckets`.

    Exact dynamic programme over the distinct lengths rounded up to `multiple`.
    """
    rounded = np.maximum(multiple, np.ceil(np.asarray(lengths) / multiple).astype(int) * multiple)
    values, counts = np.unique(rounded, return_counts=True)
    n = len(values)
    k = min(max_buckets, n)
    # cost(i, j): prefixes with rounded length in values[i..j] padded to values[j].
    csum = np.concatenate([[0], np.cumsum(counts)])
    wsum = np.concatenate([[0], np.cumsum(counts * values)])

    def cost(i: int, j: int) -> int:
        return int(values[j] * (csum[j + 1] - csum[i]) - (wsum[j + 1] - wsum[i]))

    best = np.full((k + 1, n), np.iinfo(np.int64).max, np.int64)
    back = np.zeros((k + 1, n), int)
    for j in range(n):
        best[1, j] = cost(0, j)
    for b in range(2, k + 1):
        for j in range(n):
            for i in range(1, j + 1):
                if best[b - 1, i - 1] == np.iinfo(np.int64).max:
                    continue
                c = best[b - 1, i - 1] + cost(i, j)
                if c < best[b, j]:
                    best[b, j], back[b, j] = c, i
    b = int(np.argmin(best[1:, n - 1])) + 1
    widths, j = [], n - 1
    while b >= 1 and j >= 0:
        widths.append(int(values[j]))
        j = back[b, j] - 1 if b > 1 else -1
        b -= 1
    return sorted(widths)


def bucket_of(length: int, widths: Sequence[int]) -> int:
    """Index of the narrowest bucket that holds `length`."""
    for i, w in enumerate(widths):
        if length <= w:
            return i
    raise ValueError(f"prefix of {length} tokens exceeds the widest bucket {widths[-1]}")


def pad_layout(layout: TaskLayout, rows: int, scored: int, tasks: int) -> TaskLayout:
    """The same layout with every group padded to `rows` rows, `scored` positions and `tasks` tasks,
    so layouts of different task subsets share one compiled program."""
    groups = []
    for g in layout.groups:
        r, length, m, s = g.shape
        if (r, m, s) > (rows, scored, tasks) or m > scored or s > tasks or r > rows:
            raise ValueError(f"cannot pad a group of shape {g.shape} down to ({rows}, {length}, {scored}, {tasks})")
        pad_rows = ((0, rows - r), (0, 0))
        score_task = np.where(g.score_task == s, tasks, g.score_task).astype(np.int32)
        groups.append(
            RowGroup(
                np.pad(g.tokens, pad_rows),
                np.pad(g.task_positions, pad_rows),
                np.pad(g.segment_ids, pad_rows, constant_values=-1),
                np.pad(g.score_index, (0, scored - m)),
                np.pad(g.score_target, (0, scored - m)),
                np.pad(score_task, (0, scored - m), constant_values=tasks),
                np.pad(g.tasks, (0, tasks - s), constant_values=-1),
            )
        )
    return dataclasses.replace(layout, groups=groups)


def task_spans(group: RowGroup) -> list[tuple[int, int]]:
    """(flat start r * L + l, length) of every task in a group, in row order."""
    segments = group.segment_ids.ravel()
    first = np.flatnonzero((group.task_positions.ravel() == 0) & (segments >= 0))
    ends = np.append(first[1:], segments.size)
    # A task runs from its first token while the segment id stays the same (padding or the next task ends it).
    return [
        (int(s), int(np.argmax(np.append(segments[s:e] != segments[s], True))))
        for s, e in zip(first, ends, strict=True)
    ]


def add_task_windows(layouts: Sequence[TaskLayout], widths: Sequence[int]) -> list[TaskLayout]:
    """The layouts with task windows attached, one window shape for every group of every layout.

    Each task gets a window of the narrowest of `widths` (ascending, the last >= every task) that
    holds it: the `width` flat token indices from its first token on, clipped at the group's end
    (a window's tail past its task is never read back: causal attention keeps the task's own
    queries off it). `window_back` sends every task token to its place in the windows.
    """
    spans = [[task_spans(g) for g in lay.groups] for lay in layouts]
    counts = np.zeros(len(widths), int)
    for group_spans in (s for lay in spans for s in lay):
        per_width = np.bincount([bucket_of(n, widths) for _, n in group_spans], minlength=len(widths))
        counts = np.maximum(counts, per_width)
    offsets = np.concatenate([[0], np.cumsum(counts * np.asarray(widths))])
    out = []
    for lay, lay_spans in zip(layouts, spans, strict=True):
        groups = []
        for g, group_spans in zip(lay.groups, lay_spans, strict=True):
            size = g.tokens.size
            index = [np.zeros((int(c), w), np.int32) for c, w in zip(counts, widths, strict=True)]
            back = np.zeros(size, np.int32)
            used = np.zeros(len(widths), int)
            for start, n in group_spans:
                b = bucket_of(n, widths)
                j, used[b] = used[b], used[b] + 1
                index[b][j] = np.minimum(start + np.arange(widths[b]), size - 1)
                back[start : start + n] = offsets[b] + j * widths[b] + np.arange(n)
            kept = tuple(a for a in index if a.shape[0])
            groups.append(dataclasses.replace(g, window_index=kept, window_back=back))
        out.append(dataclasses.replace(lay, groups=groups))
    return out
