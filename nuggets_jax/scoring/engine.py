"""The scoring engine: zero-shot once per task, then every candidate as a cached prefix.

Per device call the batch is [C candidates] x [R rows x L tokens] of packed tasks:
`encode_prefix` runs once per block of C candidates and its K/V stays on the devices while every
row group of the task set attends to it. Only positions that predict a response token reach the
LM head, and their log-probs are summed per task on the device, so a call returns [C, S] sums.
All programs are compiled ahead of time (one encode and one step per prefix bucket); the loop
only calls compiled executables, so nothing compiles after warm-up.

The loop over blocks of candidates, saved chunk by chunk to the store, is `blocks.BlockScorer`
(the exact pass `one_shot.run_one_shot` and the adaptive rounds run through it). This module runs
past 400 lines because `Engine` is one object: its compiled programs, the device arrays of its row
groups and the dispatch/collect pairs that use them share one state.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nuggets_jax import sharding
from nuggets_jax.data import TokenizedPrefixes, TokenizedTasks
from nuggets_jax.errors import UserError
from nuggets_jax.models.llama import Llama, PrefixCache, TaskWindows
from nuggets_jax.scoring import memory
from nuggets_jax.scoring.packing import (
    RowGroup,
    TaskLayout,
    add_task_windows,
    bucket_of,
    build_layout,
    fewest_rows,
    pad_layout,
    plan_rows,
    prefix_buckets,
)


class ScoringError(UserError, RuntimeError):
    """Scoring cannot go on (non-finite log-probs, shapes the model cannot take)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Batching knobs. None of them changes a score beyond float32 rounding of different shapes.

    Attributes:
      candidates_per_device: candidates per device in one call (C = this x devices); 0 = auto
        (`auto_candidates`): one when a candidate's tasks fill a call, else as many as
        tokens_per_device holds (short task sets), never more than the pool fills.
      tokens_per_device: target task tokens per device per call (candidates_per_device x L); the
        row length L follows from it. 0 = per platform (AUTO_TOKENS_PER_DEVICE).
      row_length: L, tokens per packed task row (one row per candidate per call); 0 = chosen by
        `packing.plan_rows` (fewest rows of at most tokens_per_device / candidates_per_device).
      max_prefix_buckets: prefix widths to compile (padding vs compile count).
      lm_head_tokens: positions per LM-head chunk per device (bounds the [.., V] logits);
        0 = per platform (AUTO_LM_HEAD_TOKENS).
      lm_head_vocab_tile: vocabulary entries per LM-head tile (running log-sum-exp over tiles, so
        the logits of a tile stay in cache); 0 = per platform (AUTO_LM_HEAD_VOCAB_TILE, where 0 is
        the whole vocabulary), a value >= the vocabulary size = the whole vocabulary.
      attention_queries: queries per attention step: attention runs in task windows (each task
        attends to its own earlier tokens only), max(1, this // width) windows at a time, and the
        row tokens attend to the prefix about this many at a time, so the scores stay in cache;
        0 = per platform (AUTO_ATTENTION_QUERIES, where 0 is everything at once).
      attention_block: queries per causal block inside a task window: block j attends only to the
        window's keys up to its own end, so most scores above the diagonal are skipped; 0 = per
        platform (AUTO_ATTENTION_BLOCK), a value >= the widest window = whole windows.
      max_window_widths: task-window widths to lay out (padding inside windows vs program size).
      device_memory_gib: memory a device may use; 0 = what the runtime reports (none on CPU). With
        auto tokens_per_device the row size is halved until the compiled programs fit in it.
    """

    candidates_per_device: int = 0
    tokens_per_device: int = 0
    row_length: int = 0
    max_prefix_buckets: int = 4
    lm_head_tokens: int = 0
    lm_head_vocab_tile: int = 0
    attention_queries: int = 0
    attention_block: int = 0
    max_window_widths: int = 4
    device_memory_gib: float = 0.0

    def for_platform(self, platform: str) -> EngineConfig:
        """This config with the 0 (auto) sizes filled in for `platform` ("cpu", "gpu", "tpu")."""
        accel = platform != "cpu"
        return dataclasses.replace(
            self,
            tokens_per_device=self.tokens_per_device or AUTO_TOKENS_PER_DEVICE[accel],
            lm_head_tokens=self.lm_head_tokens or AUTO_LM_HEAD_TOKENS[accel],
            lm_head_vocab_tile=self.lm_head_vocab_tile or AUTO_LM_HEAD_VOCAB_TILE[accel],
            attention_queries=self.attention_queries or AUTO_ATTENTION_QUERIES[accel],
            attention_block=self.attention_block or AUTO_ATTENTION_BLOCK[accel],
        )


# (CPU, accelerator) defaults. On CPU small calls, 1024-entry vocabulary tiles and one task window
# per attention step in causal blocks of 64 queries keep the working set in cache and skip most
# masked scores (BENCHMARKS.md, section 1) and bound host memory; on GPU/TPU big calls, the whole
# vocabulary and every whole window at once keep the matrix units busy.
AUTO_TOKENS_PER_DEVICE = (2048, 16384)
AUTO_LM_HEAD_TOKENS = (2048, 1024)
AUTO_LM_HEAD_VOCAB_TILE = (1024, 0)
AUTO_ATTENTION_QUERIES = (128, 1 << 30)
AUTO_ATTENTION_BLOCK = (64, 1 << 30)


def _merge(graphdef, vocab_shards: int, state) -> Llama:
    model = nnx.merge(graphdef, state)
    model.vocab_shards = vocab_shards
    return model


def _encode_program(graphdef, vocab_shards, state, tokens, mask) -> PrefixCache:
    return _merge(graphdef, vocab_shards, state).encode_prefix(tokens, mask)


def _step_program(
    graphdef,
    vocab_shards: int,
    tasks_per_group: int,
    lm_chunk: int,
    lm_head_vocab_tile: int,
    attention_queries: int,
    attention_block: int,
    state,
    cache,
    tokens,
    task_positions,
    segment_ids,
    score_index,
    score_target,
    score_task,
    window_index,
    window_back,
):
    """[C, R, L] rows after each candidate's prefix -> per-task sums: logp [C, S] f32, correct [C, S] i32."""
    model = _merge(graphdef, vocab_shards, state)
    windows = TaskWindows(tuple(window_index), window_back, attention_queries, attention_block)
    h = model.forward_rows(cache, tokens, task_positions, segment_ids, windows)  # [C, R, L, D]
    c, d = h.shape[0], h.shape[-1]
    h = jnp.take_along_axis(h.reshape(c, -1, d), score_index[..., None], axis=1)  # [C, M, D]
    logp, correct = model.token_logprobs(h, score_target, lm_chunk, lm_head_vocab_tile)  # [C, M]

    def per_task(values, tasks):  # the padding positions count for task S, dropped
        return jax.ops.segment_sum(values, tasks, num_segments=tasks_per_group + 1)[:tasks_per_group]

    logp_sum = jax.vmap(per_task)(logp, score_task)
    correct_sum = jax.vmap(per_task)(correct.astype(jnp.int32), score_task)
    return logp_sum, correct_sum


@dataclasses.dataclass
class PassStats:
    """What one pass did, for run.json."""

    wall_s: float = 0.0
    calls: int = 0
    candidates: int = 0
    pairs: int = 0
    task_tokens: int = 0  # real (unpadded) task tokens processed
    scored_tokens: int = 0
    flops: float = 0.0  # model FLOPs of the real tokens (prefix encoding included)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        s = max(self.wall_s, 1e-9)
        out.update(pairs_per_s=self.pairs / s, tokens_per_s=self.task_tokens / s, flops_per_s=self.flops / s)
        return out


class Engine:
    """Compiled scoring programs for one model, one task set and the prefix lengths of a pool.

    The programs take the parameters as an argument: `state` may be replaced by another state of
    the same structure, dtype and sharding (fine-tuned weights) without recompiling.
    """

    def __init__(
        self,
        model: Llama,
        tasks: TokenizedTasks,
        prefix_lengths: Sequence[int],
        config: EngineConfig | None = None,
        mesh: jax.sharding.Mesh | None = None,
        log: Callable[[str], None] = print,
        column_sets: Sequence[Sequence[int]] = (),
    ):
        """Packs the tasks, picks prefix buckets and compiles every program.

        Args:
          model: the model; its parameters are laid out on the mesh by the sharding table
            (`sharding.ShardPlan`; already there when loaded with `load_model(..., mesh=)`).
          tasks: the tokenized task set (all columns).
          prefix_lengths: every prefix length that will be scored (bucket choice).
          config: batching knobs (default EngineConfig()).
          mesh: the (data, model) mesh; default all devices of all processes, data parallel.
          log: progress messages.
          column_sets: optional task subsets (e.g. adaptive rounds) to lay out as well; they share
            one padded shape, so they add one step program per prefix bucket.
        """
        self.mesh = mesh or sharding.make_mesh()
        config_in = config
        self.config = config = (config or EngineConfig()).for_platform(self.mesh.devices.flat[0].platform)
        self.model_config = model.config
        self.tasks = tasks
        self.num_tasks = len(tasks.ids)
        self.task_lengths = [len(t) for t in tasks.ids]
        self.plan = sharding.ShardPlan.of(model.config, sharding.model_size(self.mesh))
        self.num_candidates = max(1, len(prefix_lengths) - 1)  # the zero-shot prefix comes last

        graphdef, state = nnx.split(model)
        self.state_shardings = sharding.param_shardings(self.mesh, self.plan, state)
        self.state = _place(state, self.state_shardings)
        self.param_bytes_per_device = sharding.bytes_per_device(self.state, self.state_shardings)
        self.memory_limit = memory.device_memory(self.mesh.devices.flat[0], config.device_memory_gib)
        log(f"engine: {self.plan.describe()}; parameters {memory.gib(self.param_bytes_per_device)} per device")
        self._check_params_fit(model)
        self.buckets = prefix_buckets(list(prefix_lengths), config.max_prefix_buckets)
        auto_tokens = (config_in or EngineConfig()).tokens_per_device == 0
        t0 = time.perf_counter()
        while True:
            self._lay_out(column_sets)
            self._encode, self._step = self._compile(graphdef, model.dtype)
            self.program_bytes = max(memory.program_bytes(c) for c in [*self._encode.values(), *self._step.values()])
            if self.memory_limit is None or self.program_bytes <= memory.PROGRAM_SHARE * self.memory_limit:
                break
            if not auto_tokens or self.config.tokens_per_device // 2 < max(self.task_lengths):
                raise ScoringError(
                    f"the scoring program needs {memory.gib(self.program_bytes)} per device, the device has "
                    f"{memory.gib(self.memory_limit)}: lower scoring.tokens_per_device "
                    f"(now {self.config.tokens_per_device}) or raise mesh.model (now {self.plan.degree})."
                )
            half = self.config.tokens_per_device // 2
            log(f"engine: {memory.gib(self.program_bytes)} per device does not fit; tokens_per_device {half}")
            self.config = dataclasses.replace(self.config, tokens_per_device=half)
        self.compile_s = time.perf_counter() - t0
        self._warn_past_positions(log)
        self.programs = len(self._encode) + len(self._step)

        self._group_arrays: dict[int, list[tuple[jax.Array, ...]]] = {}
        self._dealt_arrays: dict[tuple, tuple] = {}
        log(self._summary())

    def _lay_out(self, column_sets) -> None:
        """Slots and task layouts at the current tokens_per_device: C candidates per device, rows of
        row_length tokens, one row per group, task windows of a few widths."""
        devices = sharding.data_size(self.mesh)
        self.candidates_per_device = self.config.candidates_per_device or auto_candidates(
            self.task_lengths, self.config.tokens_per_device, self.num_candidates, devices, len(self.buckets)
        )
        self.slots = self.candidates_per_device * devices  # C, global
        self.local = sharding.local_slots(self.mesh, self.slots)
        # One process: a lone candidate's rows can be dealt over the slots (`dispatch_dealt`).
        dealable = jax.process_count() == 1 and self.slots > 1
        self.row_length = self._row_length(dealable)
        self.window_widths = prefix_buckets(self.task_lengths, self.config.max_window_widths)
        self.layout = self._layouts([np.arange(self.num_tasks)])[0]
        self.subset_layouts = self._layouts(column_sets) if len(column_sets) else []
        self.rows_per_group = self.layout.groups[0].tokens.shape[0]
        # Row groups a block leftover can deal over the slots (`blocks.plan_blocks`); 0 = never.
        self.deal_groups = len(self.layout.groups) if dealable else 0
        self.lm_chunk = max(8, self.config.lm_head_tokens // self.candidates_per_device)

    def _check_params_fit(self, model: Llama) -> None:
        if self.memory_limit is None or self.param_bytes_per_device <= memory.PROGRAM_SHARE * self.memory_limit:
            return
        local = jax.local_device_count()
        need = memory.fit_degree(model.config, model.dtype, self.memory_limit, local)  # raises if none fits
        raise ScoringError(
            f"the parameters take {memory.gib(self.param_bytes_per_device)} per device at mesh.model="
            f"{self.plan.degree}, the device has {memory.gib(self.memory_limit)}: set mesh.model={need} "
            "(or 0 to pick it)."
        )

    def _row_length(self, dealable: bool) -> int:
        """L: the configured row length, or `plan_rows`'s (a row count the slots divide when dealable)."""
        config, longest = self.config, max(self.task_lengths)
        per_call = config.tokens_per_device // self.candidates_per_device
        rows_multiple = self.slots if dealable else 1
        row_length = config.row_length or plan_rows(self.task_lengths, per_call, rows_multiple=rows_multiple)
        if row_length < longest:
            raise ScoringError(
                f"scoring.row_length={row_length} is shorter than the longest task "
                f"({longest} tokens); set 0 (auto) or at least {longest}."
            )
        return row_length

    def _layouts(self, column_sets: Sequence[Sequence[int]]) -> list[TaskLayout]:
        """Layouts of the column sets, one row per group, padded to one shape (task windows included)."""
        lengths = self.task_lengths
        layouts = []
        for cols in column_sets:
            rows = fewest_rows([lengths[c] for c in cols], self.row_length)
            layouts.append(build_layout(self.tasks.ids, self.tasks.scored_masks(), cols, self.row_length, 1, rows=rows))
        m = max(g.shape[2] for lay in layouts for g in lay.groups)
        s = max(g.shape[3] for lay in layouts for g in lay.groups)
        return add_task_windows([pad_layout(lay, 1, m, s) for lay in layouts], self.window_widths)

    def _warn_past_positions(self, log: Callable[[str], None]) -> None:
        longest = self.buckets[-1] + self.row_length
        limit = self.model_config.max_position_embeddings
        if longest > limit:
            log(f"warning: prefix + task reach {longest} positions, beyond the model's max_position_embeddings={limit}")

    def _compile(self, graphdef, dtype) -> tuple[dict, dict]:
        """Every program, ahead of time: encode[width] and step[width, group program_shape]."""
        config, cfg, slots = self.config, self.model_config, self.slots
        data = sharding.data_sharding(self.mesh)
        kv_sharding = jax.sharding.NamedSharding(self.mesh, self.plan.cache_spec())
        shards = self.plan.vocab_shards
        shapes = {lay.groups[0].program_shape: lay.groups[0] for lay in [self.layout, *self.subset_layouts]}
        encode_programs, step_programs = {}, {}
        for width in self.buckets:
            tok = jax.ShapeDtypeStruct((slots, width), jnp.int32, sharding=data)
            msk = jax.ShapeDtypeStruct((slots, width), jnp.bool_, sharding=data)
            encode = jax.jit(
                functools.partial(_encode_program, graphdef, shards),
                in_shardings=(self.state_shardings, data, data),
                out_shardings=PrefixCache(kv_sharding, kv_sharding, data, data),
            )
            encode_programs[width] = encode.lower(self.state, tok, msk).compile()
            kv = jax.ShapeDtypeStruct(
                (cfg.num_layers, slots, width, cfg.num_kv_heads, cfg.head_dim), dtype, sharding=kv_sharding
            )
            cache = PrefixCache(kv, kv, msk, jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=data))
            for key, group in shapes.items():
                r, length, m, s = group.shape
                rows = jax.ShapeDtypeStruct((slots, r, length), jnp.int32, sharding=data)
                score = jax.ShapeDtypeStruct((slots, m), jnp.int32, sharding=data)
                windows = tuple(
                    jax.ShapeDtypeStruct((slots, *w.shape), jnp.int32, sharding=data) for w in group.window_index
                )
                back = jax.ShapeDtypeStruct((slots, r * length), jnp.int32, sharding=data)
                static = (s, self.lm_chunk, config.lm_head_vocab_tile, config.attention_queries, config.attention_block)
                step = jax.jit(
                    functools.partial(_step_program, graphdef, shards, *static),
                    in_shardings=(self.state_shardings, PrefixCache(kv_sharding, kv_sharding, data, data),
                                  *[data] * 6, tuple(data for _ in windows), data),
                    out_shardings=(data, data),
                )  # fmt: skip
                step_programs[width, key] = step.lower(
                    self.state, cache, rows, rows, rows, score, score, score, windows, back
                ).compile()
        return encode_programs, step_programs

    def _summary(self) -> str:
        r, length = self.layout.groups[0].tokens.shape
        span = "task windows of " + "/".join(str(w.shape[1]) for w in self.layout.groups[0].window_index)
        mesh = "x".join(str(n) for n in self.mesh.devices.shape)
        return (
            f"engine: {self.mesh.devices.size} device(s) (mesh data x model = {mesh}), "
            f"C={self.slots} candidates/call, rows {r}x{length} "
            f"(fill {self.layout.fill:.0%}, {len(self.layout.groups)} group(s)), attention over {span}, "
            f"prefix buckets {self.buckets}, "
            f"{self.programs} programs compiled in {self.compile_s:.1f}s"
        )

    @property
    def _n_local(self) -> int:
        return self.local.stop - self.local.start

    def _put(self, local: np.ndarray) -> jax.Array:
        return sharding.put_local(self.mesh, local, (self.slots, *local.shape[1:]))

    def _put_group(self, groups: Sequence[RowGroup]) -> tuple:
        fields = ("tokens", "task_positions", "segment_ids", "score_index", "score_target", "score_task")
        arrays = tuple(self._put(np.stack([getattr(g, f) for g in groups])) for f in fields)
        windows = tuple(self._put(np.stack(w)) for w in zip(*(g.window_index for g in groups), strict=True))
        return (*arrays, windows, self._put(np.stack([g.window_back for g in groups])))

    def bucket_width(self, length: int) -> int:
        return self.buckets[bucket_of(length, self.buckets)]

    def _encode_local(self, prefixes: Sequence[np.ndarray | None], width: int) -> PrefixCache:
        """Encodes this process's slots; None = an empty slot (all padding)."""
        tokens = np.zeros((len(prefixes), width), np.int32)
        mask = np.zeros((len(prefixes), width), bool)
        for i, ids in enumerate(prefixes):
            if ids is not None:
                tokens[i, : len(ids)] = ids
                mask[i, : len(ids)] = True
        return self._encode[width](self.state, self._put(tokens), self._put(mask))

    def dispatch_block(
        self, prefixes: Sequence[np.ndarray | None], layout: TaskLayout | None = None, width: int | None = None
    ) -> list[tuple[RowGroup, tuple]]:
        """Starts one block (this process's slots): encode once, then every row group of `layout`
        (default: all tasks). Fewer prefixes than local slots are padded with empty slots. Non-blocking."""
        if len(prefixes) > self._n_local:
            raise ValueError(f"{len(prefixes)} prefixes for {self._n_local} local slots")
        prefixes = [*prefixes, *[None] * (self._n_local - len(prefixes))]
        layout = layout or self.layout
        # With several processes every one must pick the same program: pass the global block's width.
        width = width or self.bucket_width(max((len(p) for p in prefixes if p is not None), default=0))
        cache = self._encode_local(prefixes, width)
        if id(layout) not in self._group_arrays:
            self._group_arrays[id(layout)] = [self._put_group([g] * self._n_local) for g in layout.groups]
        step = self._step[width, layout.groups[0].program_shape]
        return [
            (g, step(self.state, cache, *arrays))
            for g, arrays in zip(layout.groups, self._group_arrays[id(layout)], strict=True)
        ]

    def dispatch_dealt(
        self, prefixes: Sequence[np.ndarray], layout: TaskLayout | None = None, width: int | None = None
    ) -> list[tuple[np.ndarray, tuple]]:
        """Starts a block of k <= C candidates whose row groups are dealt over the slots. Non-blocking.

        Slot s runs candidate s % k; a candidate's groups go round its slots in turn, so a lone
        candidate (a bucket's leftover, the zero-shot prefix) keeps every device busy instead of
        one. Each call's slots run different groups after the same cached prefixes; `collect_dealt`
        reads the block back. Every process passes the same `prefixes`.
        """
        layout = layout or self.layout
        k, n_groups = len(prefixes), len(layout.groups)
        if not 0 < k <= self.slots:
            raise ValueError(f"{k} dealt prefixes for {self.slots} slots")
        width = width or self.bucket_width(max(len(p) for p in prefixes))
        cache = self._encode_local([prefixes[s % k] for s in range(self.local.start, self.local.stop)], width)
        step = self._step[width, layout.groups[0].program_shape]
        slots = np.arange(self.slots)
        turn, rank = slots // k, slots % k  # a slot's place among its candidate's slots, and its candidate
        share = np.asarray([len(range(c, self.slots, k)) for c in rank])  # slots per candidate
        pending = []
        for call in range(self.calls_per_block(prefixes, layout)):
            group = call * share + turn  # [C] the group each slot runs; >= n_groups: a repeat, unread
            key = (id(layout), *(group[self.local] % n_groups).tolist())
            if key not in self._dealt_arrays:
                self._dealt_arrays[key] = self._put_group([layout.groups[g] for g in key[1:]])
            pending.append((group, step(self.state, cache, *self._dealt_arrays[key])))
        return pending

    def forget_dealt(self, layout: TaskLayout) -> None:
        """Drops the device copies of `layout`'s dealt row groups (a pass over many column subsets
        keeps only the current one's)."""
        for key in [k for k in self._dealt_arrays if k[0] == id(layout)]:
            del self._dealt_arrays[key]

    def calls_per_block(self, dealt: Sequence[int] | None = None, layout: TaskLayout | None = None) -> int:
        """Step calls of one block: one per row group, or for k dealt candidates `dealt_calls`."""
        n_groups = len((layout or self.layout).groups)
        return n_groups if dealt is None else dealt_calls(n_groups, self.slots, len(dealt))

    def collect_dealt(self, pending: list[tuple[np.ndarray, tuple]], k: int, layout: TaskLayout | None = None):
        """Waits for a `dispatch_dealt` block of k candidates; returns logp [k, T] and correct [k, T]
        on every process."""
        layout = layout or self.layout
        logp = np.full((k, self.num_tasks), np.nan, np.float32)
        correct = np.zeros((k, self.num_tasks), np.int32)
        for group, (logp_sum, correct_sum) in pending:
            all_logp, all_correct = sharding.gather(logp_sum), sharding.gather(correct_sum)
            for s, g in enumerate(group):
                if g < len(layout.groups):
                    tasks = layout.groups[g].tasks
                    used = tasks >= 0
                    logp[s % k, tasks[used]] = all_logp[s, used]
                    correct[s % k, tasks[used]] = all_correct[s, used]
        return logp, correct

    def collect_block(self, pending: list[tuple[RowGroup, tuple]]) -> tuple[np.ndarray, np.ndarray]:
        """Waits for a block; returns this process's one_logp [C_local, T] and one_correct [C_local, T]."""
        logp = np.full((self._n_local, self.num_tasks), np.nan, np.float32)
        correct = np.zeros((self._n_local, self.num_tasks), np.int32)
        for group, (logp_sum, correct_sum) in pending:
            used = group.tasks >= 0
            logp[:, group.tasks[used]] = sharding.get_local(logp_sum)[:, used]
            correct[:, group.tasks[used]] = sharding.get_local(correct_sum)[:, used]
        return logp, correct

    def zero_shot(self, zero_prefix: np.ndarray) -> tuple[np.ndarray, np.ndarray, PassStats]:
        """zero_logp [T], zero_correct [T]: every task after the zero-shot prefix (often empty).

        The row groups are spread over the slots of a few calls, one group per slot.
        """
        t0 = time.perf_counter()
        pending = self.dispatch_dealt([zero_prefix])
        logp, correct = (x[0] for x in self.collect_dealt(pending, 1))
        stats = PassStats(
            wall_s=time.perf_counter() - t0,
            calls=len(pending) + 1,
            candidates=1,
            pairs=self.num_tasks,
            task_tokens=self.layout.real_tokens,
            scored_tokens=self.layout.scored_tokens,
            flops=self.pair_flops(len(zero_prefix)),
        )
        return logp, correct, stats

    def pair_flops(self, prefix_length: int) -> float:
        """Model FLOPs of one candidate: its prefix once, then every task after it (`ModelConfig.candidate_flops`)."""
        return self.model_config.candidate_flops(prefix_length, self.task_lengths, self.tasks.n_tokens)


def auto_candidates(
    task_lengths: Sequence[int], tokens_per_device: int, candidates: int, devices: int, buckets: int
) -> int:
    """Candidates per device per call for candidates_per_device=0.

    One candidate's tasks are packed as if it had a call of its own (`plan_rows`); when they fit
    one row, as many candidates share a call as rows of that length fit `tokens_per_device`, so a
    short task set fills a call as a long one does. The blocks of one prefix bucket share a width
    (`blocks.plan_blocks`), so no more slots than the pool's share of a bucket
    (candidates / (devices x buckets)), rounded up: a small pool is not padded with empty slots.
    """
    row = plan_rows(task_lengths, tokens_per_device)
    if len(fewest_rows(task_lengths, row)) > 1:
        return 1
    share = -(-candidates // (devices * max(1, buckets)))
    return max(1, min(tokens_per_device // row, share))


def dealt_calls(groups: int, slots: int, k: int) -> int:
    """Calls of a dealt block: k candidates' `groups` row groups each, over slots // k slots apiece."""
    return -(-groups // (slots // k))


def _place(state, shardings):
    """`state` laid out by `shardings`; arrays already there (loaded onto the mesh) are not moved, so
    nothing is compared or copied across processes. Abstract leaves (a model from `nnx.eval_shape`)
    stay abstract: the engine then compiles every program without weights (memory analysis only)."""
    leaves, treedef = jax.tree.flatten(state)
    targets = jax.tree.leaves(shardings)

    def place(x, s):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
            return x
        return jax.device_put(x, s)

    placed = [place(x, s) for x, s in zip(leaves, targets, strict=True)]
    return jax.tree.unflatten(treedef, placed)


def prefix_lengths_of(prefixes: TokenizedPrefixes) -> list[int]:
    return [len(p) for p in prefixes.ids] + [len(prefixes.zero_shot)]
