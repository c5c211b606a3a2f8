"""Training examples for fine-tuning: tokenization with exact response spans, the data order, packing.

A training example is `[leading special tokens] prompt ids ++ response ids [++ eos]`, tokenized
by `nuggets_jax.data` so the response span is exact. Examples are packed into rows of
`row_length` tokens (each attends only to itself: segment ids, positions from 0); an optimizer
step is `micro_batches` x `batch_rows` rows, so every step has one static shape. The order is a
function of the examples, the seed and the step's shape alone, so a resumed run replays it exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax.errors import UserError


class FinetuneError(UserError):
    """A training config, data set or run directory that cannot be used; the message says what to change.

    Defined here, the bottom of the fine-tuning modules, so `checkpoint`, `step` and `train` raise the same class.
    """


@dataclasses.dataclass(frozen=True)
class Examples:
    """Tokenized training examples: `ids[i][response_start[i]:]` is the trained span, or the
    tokens `trained[i]` marks (the assistant turns of a conversation under the chat template)."""

    ids: list[np.ndarray]  # E x [n_e] int32
    response_start: np.ndarray  # [E] first trained token
    record_ids: list[str]
    trained: list[np.ndarray] | None = None  # E x [n_e] bool; None: every token from response_start on

    def mask(self, e: int) -> np.ndarray:
        """[n_e] bool: the trained tokens of example e."""
        if self.trained is not None:
            return self.trained[e]
        return np.arange(len(self.ids[e])) >= self.response_start[e]

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(x) for x in self.ids], np.int64)

    def digest(self) -> str:
        """sha256 over the token ids and response spans (what training sees)."""
        h = hashlib.sha256()
        for ids, start in zip(self.ids, self.response_start, strict=True):
            h.update(np.int64(start).tobytes())
            h.update(np.asarray(ids, np.int32).tobytes())
            h.update(b"|")
        for mask in self.trained or ():
            h.update(np.packbits(mask).tobytes())
        return h.hexdigest()


def tokenize_examples(
    tokenizer,
    records: Sequence[data_lib.Record],
    template: data_lib.Template | data_lib.ChatTemplate,
    max_tokens: int = 512,
    eos: bool = True,
    bos: bool = True,
    source: str = "train",
    untrainable: list[str] | None = None,
) -> Examples:
    """`[leading specials] prompt ++ response [++ eos]`, cut to `max_tokens` (no eos after a cut).

    Under the chat template the example is the rendered conversation alone (the template writes
    its special tokens and end-of-turn text: no bos or eos is added) and the loss is on every
    assistant turn, the scored spans of `data.tokenize_tasks`.

    `untrainable`: None = a record that keeps no response token within `max_tokens` is an error; a
    list = such records are left out and their ids appended.

    Raises:
      DataError: for such a record when `untrainable` is None (names the ids).
      FinetuneError: `eos` is asked for but the tokenizer has no eos token.
    """
    chat = isinstance(template, data_lib.ChatTemplate)
    bos, eos = bos and not chat, eos and not chat
    lead = data_lib.leading_special_tokens(tokenizer) if bos else []
    eos_id = tokenizer.eos_token_id if eos else None
    if eos and eos_id is None:
        raise FinetuneError(f"{source}: the tokenizer has no eos token; set train.eos=False.")
    room = max_tokens - len(lead)
    uncut = data_lib.TokenPolicy(max_task_tokens=1 << 30)
    tasks = data_lib.tokenize_tasks(tokenizer, records, template, uncut, source)
    ids, masks, starts, kept, empty = [], [], [], [], []
    for record, seq, start, mask in zip(records, tasks.ids, tasks.response_start, tasks.scored_masks(), strict=True):
        if len(seq) + (1 if eos else 0) <= room:
            ids.append(np.asarray([*lead, *seq.tolist(), *([eos_id] if eos else [])], np.int32))
            masks.append(np.concatenate([np.zeros(len(lead), bool), mask, np.ones(1 if eos else 0, bool)]))
        elif start < room:
            ids.append(np.asarray([*lead, *seq[:room].tolist()], np.int32))  # cut: the response did not end, no eos
            masks.append(np.concatenate([np.zeros(len(lead), bool), mask[:room]]))
        else:
            empty.append(record.id)
            continue
        starts.append(start + len(lead))
        kept.append(record.id)
    if untrainable is not None:
        untrainable += empty
    elif empty:
        shown = ", ".join(repr(i) for i in empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise data_lib.DataError(
            f"{source}: {len(empty)} record(s) keep no response token within train.max_tokens={max_tokens}: "
            f"ids {shown}. Raise train.max_tokens or drop them."
        )
    return Examples(ids, np.asarray(starts, np.int32), kept, masks if chat else None)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One optimizer step: K micro-batches of R rows x L tokens."""

    tokens: np.ndarray  # [K, R, L] int32
    positions: np.ndarray  # [K, R, L] int32: position inside its example
    segment_ids: np.ndarray  # [K, R, L] int32: example slot in the row, -1 = padding
    targets: np.ndarray  # [K, R, L] int32: the next token of the same example (0 elsewhere)
    weights: np.ndarray  # [K, R, L] float32: 1 where the position predicts a response (or eos) token

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    @property
    def response_tokens(self) -> int:
        return int(self.weights.sum())

    @property
    def num_examples(self) -> int:
        return int(((self.positions == 0) & (self.segment_ids >= 0)).sum())


def pack_micro_batch(examples: Examples, rows: Sequence[Sequence[int]], batch_rows: int, row_length: int) -> tuple:
    """Arrays [R, L] of rows of example indices (each row's examples back to back)."""
    shape = (batch_rows, row_length)
    tokens, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    segments, targets = np.full(shape, -1, np.int32), np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        offset = 0
        for slot, e in enumerate(row):
            ids, trained = examples.ids[e], np.flatnonzero(examples.mask(e))
            n = len(ids)
            if offset + n > row_length:
                raise ValueError(f"row {r} holds {offset + n} tokens, more than row_length={row_length}")
            span = slice(offset, offset + n)
            tokens[r, span], positions[r, span], segments[r, span] = ids, np.arange(n), slot
            targets[r, offset : offset + n - 1] = ids[1:]
            # Position p predicts token p + 1: a trained token p is read at p - 1.
            weights[r, offset + trained - 1] = 1.0
            offset += n
    return tokens, positions, segments, targets, weights


class DataOrder:
    """The example stream: epoch e is a permutation seeded by (seed, e); it is packed step by step.

    A micro-batch takes examples from the stream in order, each into the first of its R rows with
    room (first fit), and ends at the first example that fits no row, which opens the next one.
    Everything is a function of (examples, seed, R, L, K), so a resumed run replays the same order.
    """

    def __init__(self, lengths: Sequence[int], seed: int, batch_rows: int, row_length: int, micro_batches: int):
        self.lengths = [int(n) for n in lengths]
        self.seed, self.rows, self.row_length, self.micro_batches = seed, batch_rows, row_length, micro_batches
        self.position = 0  # examples taken from the stream so far
        self._perms: dict[int, np.ndarray] = {}
        too_long = [i for i, n in enumerate(self.lengths) if n > row_length]
        if too_long:
            raise FinetuneError(f"examples {too_long[:5]} are longer than row_length={row_length}.")

    def example_at(self, position: int) -> int:
        n = len(self.lengths)
        epoch = position // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        return int(self._perms[epoch][position % n])

    def next_micro_batch(self) -> list[list[int]]:
        rows: list[list[int]] = [[] for _ in range(self.rows)]
        free = [self.row_length] * self.rows
        while True:
            e = self.example_at(self.position)
            n = self.lengths[e]
            r = next((r for r in range(self.rows) if free[r] >= n), None)
            if r is None:
                return rows
            rows[r].append(e)
            free[r] -= n
            self.position += 1

    def next_step(self) -> list[list[list[int]]]:
        return [self.next_micro_batch() for _ in range(self.micro_batches)]

    def skip(self, steps: int) -> None:
        for _ in range(steps):
            self.next_step()


def make_batch(examples: Examples, step_rows: Sequence[Sequence[Sequence[int]]], batch_rows: int, row_length: int):
    """A `Batch` from K micro-batches of rows of example indices."""
    parts = [pack_micro_batch(examples, rows, batch_rows, row_length) for rows in step_rows]
    return Batch(*(np.stack(field) for field in zip(*parts, strict=True)))


def auto_row_length(examples: Examples, multiple: int = 64) -> int:
    return max(multiple, math.ceil(int(examples.lengths.max()) / multiple) * multiple)
