"""The synchronous engine: schedule -> one decode step for every running sequence -> sample -> retire.

Single-threaded by design (the AsyncEngine runs it on its own thread). Requests of any
condition, sampling settings, policy and budget share one batch; a CFG request is two
rows (conditional, unconditional) that share one sample per step.

A decode step is the model step, then `sample_and_feed` over static per-batch inputs (refilled only
when the batch changes): on the GPU both are one CUDA graph replay, and the host keeps only integer
bookkeeping (the mirror of each sequence's stored slots, eviction stats, progress and retirement).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..config import ConfigError, EngineConfig, ResolvedCache
from ..kv.kernels import HAS_TRITON
from ..kv.policy import POLICY_MODE
from ..kv.pool import FP8, PageAllocator, PoolGeometry, kv_storage_dtype, pages_for
from ..kv.spill import SpillArena, SpillRecord
from ..loading import LoadedModels, limit_cpu_threads
from ..sampling import cfg_combine, k_max_bucket, sample_tokens, uniform_from
from .imaging import DoneImage, ImageStage
from .request import (
    DeadlineExceeded,
    EngineError,
    Event,
    GenerationRequest,
    InvalidRequest,
    Progress,
    QueueFull,
    RequestCancelled,
    RequestFailed,
    RequestStats,
)
from .runner import ModelRunner, RowState
from .scheduler import Schedulable, Scheduler

Sink = Callable[[Event | EngineError], None]


@dataclass
class EngineStats:
    running: int = 0  # requests with KV in the pool
    waiting: int = 0  # queued (including swapped out)
    kv_capacity_tokens: int = 0  # token slots in the pool (per layer and head)
    kv_used_tokens: int = 0  # slots allocated to running sequences
    kv_pool_bytes: int = 0
    evictions_total: int = 0
    spilled_bytes_total: int = 0
    swapped_out_total: int = 0
    images_total: int = 0
    tokens_total: int = 0
    requests_total_by_status: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Request(Schedulable):
    req: GenerationRequest = None  # type: ignore[assignment]
    sink: Sink = None  # type: ignore[assignment]
    cache: ResolvedCache = None  # type: ignore[assignment]
    request_id: str = ""
    slot: int = -1  # row of the per-request token buffers
    n_sampled: int = 0  # image tokens sampled so far
    n_stored: list[int] = field(default_factory=list)  # host mirror of each sequence's valid slots
    started: float = 0.0
    stats: RequestStats = field(default_factory=RequestStats)
    cancelled: bool = False
    swap_data: list | None = None
    spill: list[SpillRecord] = field(default_factory=list)  # per sequence: its evicted K/V in the arena
    logprobs: list[torch.Tensor] = field(default_factory=list)

    @property
    def cfg_pair(self) -> bool:
        return len(self.allocs) == 2


class StepBatch(NamedTuple):
    """Inputs of one sampling step: views of two packed tensors, ints (11, W) and floats (3, W).
    Item k (a request, or padding) has the per-item fields; row r (a sequence) has `row` and `owner`."""

    cond: torch.Tensor  # (W,) logits row of item k's conditional sequence
    uncond: torch.Tensor  # (W,) and of its unconditional one (== cond without CFG)
    seed: torch.Tensor
    j: torch.Tensor  # image tokens sampled so far: the index of the one sampled now (advanced in place)
    cfg_interval: torch.Tensor
    top_k: torch.Tensor
    greedy: torch.Tensor  # 0/1
    forced: torch.Tensor  # 0/1: take forced[slot, j] instead of a sample
    slot: torch.Tensor  # row of the engine's codes/forced
    row: torch.Tensor  # (W,) a runner row to feed
    owner: torch.Tensor  # (W,) the item whose token that row is fed
    cfg_scale: torch.Tensor  # floats from here
    temperature: torch.Tensor
    top_p: torch.Tensor

    @classmethod
    def of(cls, ints: torch.Tensor, floats: torch.Tensor) -> StepBatch:
        return cls(*ints.unbind(0), *floats.unbind(0))


_N_FLOATS = 3  # the last fields of StepBatch
_N_INTS = len(StepBatch._fields) - _N_FLOATS


def uses_sampling_kernel(device: torch.device) -> bool:
    """Sampling runs as one Triton kernel (adsa_core.sampling_kernel) on CUDA, else as torch ops."""
    return device.type == "cuda" and HAS_TRITON


def sample_and_feed(b: StepBatch, logits: torch.Tensor, k_max: int, codes: torch.Tensor, forced: torch.Tensor,
                    rows: RowState, pos_offset: int, guided: torch.Tensor) -> None:
    """Image token j of every item of `b`, from its rows' logits (R, V): CFG-guided while its interval lasts,
    sampled (or forced), written to codes[slot, j] and fed to its rows for the next decode step; then j += 1.
    guided (W, V) receives the guided logits. Static shapes, no host sync: the decode CUDA graph captures it."""
    jc = b.j.clamp_max(codes.shape[1] - 1)  # an index: padding items (and capture warm-ups) count on past the end
    active = (b.cfg_scale > 1.0) & ((b.cfg_interval < 0) | (b.j <= b.cfg_interval + 1))
    if uses_sampling_kernel(logits.device):  # one launch instead of ~20 kernels: the same tokens
        from ..sampling_kernel import sample_guided_triton

        tok = sample_guided_triton(logits, b.cond, b.uncond, active, b.cfg_scale, b.temperature, b.top_k, b.top_p,
                                   b.greedy, uniform_from(b.seed, b.j), guided)
    else:
        cond, uncond = logits[b.cond], logits[b.uncond]  # (W, V)
        torch.where(active.view(-1, 1), cfg_combine(cond, uncond, b.cfg_scale), cond, out=guided)
        tok = sample_tokens(guided, b.seed, b.j, b.temperature, b.top_k, b.top_p, b.greedy.bool(), k_max)
    tok = torch.where(b.forced.bool(), forced[b.slot, jc], tok)
    codes[b.slot, jc] = tok
    # both rows of a request get the same token, at position T_cond + j
    rows.tokens[b.row] = tok[b.owner]
    rows.positions[b.row] = jc[b.owner] + pos_offset
    b.j.add_(1)


class _DecodeBatch:
    """The running batch's step inputs in static device buffers of width max_rows (a step of bucket B
    reads [:, :B]), refilled only when the batch changes. Called by the runner after the model step
    (inside its CUDA graph, one per bucket and top-k bucket): samples and feeds one token per request."""

    def __init__(self, max_rows: int, vocab: int, codes: torch.Tensor, forced: torch.Tensor, rows: RowState,
                 pos_offset: int):
        dev = codes.device
        self.ints = torch.zeros(_N_INTS, max_rows, dtype=torch.long, device=dev)
        self.floats = torch.zeros(_N_FLOATS, max_rows, device=dev)
        self.guided = torch.zeros(max_rows, vocab, device=dev)  # (item, V): the last step's guided logits
        self.codes, self.forced, self.rows, self.pos_offset = codes, forced, rows, pos_offset
        self.k_max = 0  # top-k bucket of the batch: the graph key
        self.want: tuple[torch.Tensor, list[int]] | None = None  # items that keep log-probs (device, host)

    def __call__(self, B: int, k_max: int) -> None:
        b = StepBatch.of(self.ints[:, :B], self.floats[:, :B])
        sample_and_feed(b, self.rows.logits[:B], k_max, self.codes, self.forced, self.rows, self.pos_offset,
                        self.guided[:B])

    def state(self) -> list[torch.Tensor]:
        return [self.ints, self.codes]


class Engine:
    def __init__(self, models: LoadedModels, config: EngineConfig):
        self.models = models
        self.config = config
        if models.device.type == "cpu":
            limit_cpu_threads()  # torch's thread count is per OS thread: this is the engine's
        self.gpt = models.gpt
        self.cfg = models.gpt_config
        self.device = models.device
        self.sampling_kernel = uses_sampling_kernel(self.device)
        self.max_rows = 2 * config.max_batch_size
        geo = self._pool_geometry()
        max_pages = pages_for(self.cfg.seq_len, config.page_size)
        gpu_lock = threading.Lock()  # a CUDA graph capture and the image thread's GPU work exclude each other
        self.runner = ModelRunner(self.gpt, geo, self.max_rows, max_pages, config.cuda_graphs,
                                  config.compile_step and self.device.type == "cuda", gpu_lock)
        self.scheduler = Scheduler(PageAllocator(geo.num_pages), self.max_rows, config.page_size, config.max_queue)
        self.default_cache = config.default_cache.resolve(self.cfg)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._free_slots = list(range(config.max_batch_size - 1, -1, -1))
        B, N = config.max_batch_size, self.cfg.block_size
        self.scratch_slot = B  # padding items of a decode step write their tokens here
        self.codes = torch.zeros(B + 1, N, dtype=torch.long, device=self.device)
        self.forced = torch.zeros(B + 1, N, dtype=torch.long, device=self.device)
        self.stats_ = EngineStats(kv_capacity_tokens=geo.capacity_tokens,
                                  kv_pool_bytes=geo.num_pages * geo.bytes_per_page)
        self.images = ImageStage(models.vq if config.decode_images else None, self.device, config.vq_decode_batch,
                                 config.encode_png, compile_decode=config.compile_step, gpu_lock=gpu_lock)
        self._done: list[DoneImage] = []  # finished this step, handed to the image stage together
        self.step_listeners: list[Callable[[float, int], None]] = []
        self.fault_hook: Callable[[str], None] | None = None  # tests inject per-request failures here
        self.spill = SpillArena(config.spill_arena_bytes, geo.n_layer, geo.kv_heads, geo.head_dim, geo.dtype,
                                self.device)
        self.spill_steps_per_seq = config.spill_limit_bytes // self.spill.step_bytes
        self._staging = _Staging(self.device)
        self.batch = _DecodeBatch(self.max_rows, self.cfg.vocab_size, self.codes, self.forced, self.runner.rows,
                                  self.cfg.cls_token_num)
        self._batch_dirty = True  # the running batch changed: refill self.batch before the next step

    def _pool_geometry(self) -> PoolGeometry:
        c = self.config
        try:
            dtype = kv_storage_dtype(c.kv_cache_dtype, self.gpt.dtype)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if dtype == FP8 and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise ConfigError("kv_cache_dtype fp8 needs a GPU with fp8 support (compute capability 8.9+: L4, H100)")
        if c.kv_pool_tokens is not None:
            return PoolGeometry.for_model(self.cfg, c.page_size, 1 + pages_for(c.kv_pool_tokens, c.page_size), dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return PoolGeometry.fit_bytes(self.cfg, c.page_size, dtype, int(free * c.kv_pool_memory_fraction))
        # CPU: enough for every row to hold a whole dense sequence
        per_row = pages_for(self.cfg.seq_len, c.page_size)
        return PoolGeometry.for_model(self.cfg, c.page_size, 1 + self.max_rows * per_row, dtype)

    # --- submission (engine thread) ---------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> ResolvedCache:
        cfg = self.cfg
        if cfg.model_type == "c2i":
            if not isinstance(req.condition, int) or isinstance(req.condition, bool):
                raise InvalidRequest("this is a class-conditional model: give an integer class label")
            if not 0 <= req.condition < cfg.num_classes:
                raise InvalidRequest(f"class label {req.condition} is outside 0..{cfg.num_classes - 1}")
        else:
            c = req.condition
            if not torch.is_tensor(c) or tuple(c.shape) != (cfg.cls_token_num, cfg.caption_dim):
                raise InvalidRequest(f"text model: caption features must be ({cfg.cls_token_num}, {cfg.caption_dim})")
            if req.emb_mask is not None and tuple(req.emb_mask.shape) != (cfg.cls_token_num,):
                raise InvalidRequest(f"caption mask must have shape ({cfg.cls_token_num},)")
        if req.sampling.uses_cfg and cfg.model_type == "c2i" and not cfg.has_null_class:
            raise InvalidRequest("this checkpoint has no 'no class' embedding: use cfg_scale <= 1")
        if not 0 <= req.seed < 2**63:
            raise InvalidRequest("seed must be in [0, 2**63)")
        if req.forced_tokens is not None and tuple(req.forced_tokens.shape) != (cfg.block_size,):
            raise InvalidRequest(f"forced tokens must have shape ({cfg.block_size},)")
        try:
            cache = req.cache.resolve(cfg) if req.cache is not None else self.default_cache
        except ConfigError as e:
            raise InvalidRequest(str(e)) from None
        n_seqs = 2 if req.sampling.uses_cfg else 1
        if not self.scheduler.fits_ever(Schedulable(req.priority, n_seqs, cache.budget)):
            raise InvalidRequest(f"kv budget {cache.budget} x {n_seqs} sequences does not fit the KV pool")
        return cache

    def submit(self, req: GenerationRequest, sink: Sink) -> str:
        """Queue a request; raises InvalidRequest or QueueFull (nothing is changed then)."""
        cache = self.validate(req)
        n_seqs = 2 if req.sampling.uses_cfg else 1
        rid = req.request_id or f"req-{next(self._ids)}"
        item = _Request(priority=req.priority, n_seqs=n_seqs, budget=cache.budget, req=req, sink=sink,
                        cache=cache, request_id=rid)
        item.stats.kv_budget_tokens = cache.budget
        if not self.scheduler.enqueue(item):
            raise QueueFull(f"{self.scheduler.num_waiting} requests are waiting (limit {self.config.max_queue})")
        self.requests[rid] = item
        return rid

    def cancel(self, request_id: str) -> None:
        item = self.requests.get(request_id)
        if item is not None:
            item.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    # --- the step -----------------------------------------------------------------------------------
    def step(self) -> None:
        self._reap()
        self._schedule()
        self._compact_rows()  # a request that failed during prefill may have left a hole
        running = [r for r in self.scheduler.running if isinstance(r, _Request)]
        if running:
            self._decode(running)
        self.images.finish(self._done)
        self._done = []

    def _finish(self, item: _Request, outcome: Event | EngineError | None, status: str) -> None:
        """Release everything a request holds and deliver its last event (if any)."""
        if item.allocs:
            for a in self.scheduler.release(item):
                self.runner.clear_row(a.row)
        else:
            self.scheduler.remove_waiting(item)
        if item.slot >= 0:
            self._free_slots.append(item.slot)
            item.slot = -1
        item.stats.spilled_bytes = sum(rec.bytes for rec in item.spill)
        for rec in item.spill:
            self.spill.release(rec)
        self.requests.pop(item.request_id, None)
        self._batch_dirty = True
        by = self.stats_.requests_total_by_status
        by[status] = by.get(status, 0) + 1
        if outcome is not None:
            item.sink(outcome)

    def _fail(self, item: _Request, err: EngineError, status: str) -> None:
        self._finish(item, err, status)

    def fail_all(self, err: EngineError, status: str) -> None:
        """Every request, waiting or running, ends with `err` (engine failure, shutdown)."""
        for item in list(self.requests.values()):
            self._fail(item, err, status)

    def _reap(self) -> None:
        now = time.monotonic()
        for item in list(self.requests.values()):
            if item.cancelled:
                self._fail(item, RequestCancelled("cancelled"), "cancelled")
            elif item.req.deadline is not None and now > item.req.deadline:
                self._fail(item, DeadlineExceeded("deadline exceeded"), "deadline")

    def _schedule(self) -> None:
        admitted, swap_out = self.scheduler.schedule()
        for item in swap_out:
            self._swap_out(item)
        if swap_out:
            more, _ = self.scheduler.schedule()
            admitted += more
        self._compact_rows()
        new = []
        for item in admitted:
            if item.swap_data is not None:
                self._swap_in(item)
            else:
                new.append(item)
        if new:
            self._prefill(new)

    def _compact_rows(self) -> None:
        """Keep running rows at 0..n-1 so the decode step covers a dense prefix of rows."""
        allocs = sorted((a for r in self.scheduler.running for a in r.allocs), key=lambda a: a.row)
        n = len(allocs)
        holes = sorted(r for r in self.scheduler.free_rows if r < n)
        movers = [a for a in allocs if a.row >= n]
        for hole, a in zip(holes, movers):
            self.runner.move_row(a.row, hole)
            self.scheduler.free_rows.remove(hole)
            self.scheduler.free_rows.append(a.row)
            a.row = hole
            self._batch_dirty = True
        self.scheduler.free_rows.sort(reverse=True)

    def _setup_rows(self, item: _Request) -> None:
        c = item.cache
        mode = POLICY_MODE[c.policy] if c.evicts else 0
        for a in item.allocs:
            self.runner.assign_row(a.row, a.pages, c.budget, c.prefix, c.local, mode)
        item.stats.kv_bytes = sum(len(a.pages) for a in item.allocs) * self.runner.geo.bytes_per_page
        item.slot = self._free_slots.pop()
        if item.req.forced_tokens is not None:
            self.forced[item.slot] = item.req.forced_tokens.to(self.device)
        item.started = time.monotonic()
        item.stats.queue_s = item.started - item.req.arrival
        item.spill = [SpillRecord() for _ in item.allocs]

    def _prefill(self, items: list[_Request]) -> None:
        gpt, cfg = self.gpt, self.cfg
        rows, conds, masks = [], [], []
        for item in items:
            self._setup_rows(item)
            c = item.req.condition
            cond = torch.tensor(c, device=self.device) if isinstance(c, int) else c.to(self.device)
            mask = (item.req.emb_mask if item.req.emb_mask is not None else torch.ones(cfg.cls_token_num)).bool()
            rows.append(item.allocs[0].row)
            conds.append(cond)
            masks.append(mask)
            if item.cfg_pair:  # the unconditional branch uses the prompt's mask too, as LlamaGen
                rows.append(item.allocs[1].row)
                conds.append(gpt.null_condition(cond.unsqueeze(0))[0])
                masks.append(mask)
        try:
            with torch.no_grad():
                emb = gpt.embed_condition(torch.stack(conds))  # (n, T_cond, dim)
                valid = torch.stack(masks).to(self.device)
                logits = self.runner.prefill(rows, emb, valid)  # (n, V)
        except Exception as e:  # noqa: BLE001 - a bad prefill fails these requests, not the engine
            for item in items:
                self._fail(item, RequestFailed(f"prefill failed: {e}"), "error")
            return
        counts = valid.sum(1).tolist()
        i = 0
        for item in items:
            item.n_stored = counts[i: i + len(item.allocs)]
            i += len(item.allocs)
        self._batch_dirty = True
        # token 0 of the new requests only, eagerly, with inputs of their own: the decode batch is refilled
        ints, floats = self._pack(items, len(rows), by_row=False)  # prefill logits are in sequence order
        b = StepBatch.of(self._staging.copy(ints), self._staging.copy(floats))
        guided = torch.empty_like(logits)  # (n_rows, V): items padded to the rows' count
        sample_and_feed(b, logits, self._k_max(items), self.codes, self.forced, self.runner.rows,
                        self.cfg.cls_token_num, guided)
        want = [k for k, it in enumerate(items) if it.req.want_logits]
        if want:
            self._keep_logprobs(items, guided, self._staging.copy(torch.tensor(want)), want)
        for it in items:
            it.n_sampled += 1
        self._after_tokens(items)

    def _pack(self, items: list[_Request], width: int, by_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Host tensors (11, width) int64 and (3, width) fp32 of StepBatch fields for `items`, padded to
        `width` items with greedy ones writing to the scratch slot, and to `width` rows with rows
        n_rows..width-1 (the scratch rows of a compact batch) fed by the first padding item.
        by_row: logits are indexed by runner row (decode), else by sequence in the order of items (prefill).
        Built with numpy: this runs on every batch change, and torch.tensor(list) is 4x slower."""
        ints, floats, k = [], [], 0
        for it in items:
            s = it.req.sampling
            cond, uncond = (it.allocs[0].row, it.allocs[-1].row) if by_row else (k, k + len(it.allocs) - 1)
            k += len(it.allocs)
            ints.append((cond, uncond, it.req.seed, it.n_sampled, s.cfg_interval, s.top_k, s.greedy,
                         it.req.forced_tokens is not None, it.slot))
            floats.append((s.cfg_scale, s.temperature, s.top_p))
        n = len(items)
        i = np.empty((_N_INTS, width), dtype=np.int64)
        i[:9, :n] = np.array(ints, dtype=np.int64).T
        i[:9, n:] = np.array([0, 0, 0, 0, -1, 1, 1, 0, self.scratch_slot])[:, None]
        i[9, :k] = [a.row for it in items for a in it.allocs]
        i[9, k:] = np.arange(k, width)
        i[10, :k] = [m for m, it in enumerate(items) for _ in it.allocs]
        i[10, k:] = n
        f = np.empty((_N_FLOATS, width), dtype=np.float32)
        f[:, :n] = np.array(floats, dtype=np.float32).T
        f[:, n:] = np.array([0.0, 1.0, 1.0])[:, None]
        return torch.from_numpy(i), torch.from_numpy(f)

    def capture_graphs(self) -> int:
        """Capture the decode step's CUDA graph for every batch bucket before serving. Only with the Triton
        sampler, whose graphs do not depend on the batch's top-k; the torch sampler's are captured on first use."""
        return self.runner.capture_all(self.batch, 0) if self.sampling_kernel else 0

    def _k_max(self, items: list[_Request]) -> int:
        """The batch's top-k bucket (host int): topk over this many logits instead of sorting them all (the
        torch sampler; the Triton one needs no bucket, so one graph per batch bucket serves every batch)."""
        if self.sampling_kernel:
            return 0
        top_k = [it.req.sampling.top_k for it in items]
        return k_max_bucket(max(top_k) if min(top_k) > 0 else 0, self.cfg.vocab_size)

    def _load_batch(self, items: list[_Request]) -> None:
        """Refill the decode step's static inputs for a new batch: the only host-to-device copies of a step.
        j restarts from each request's host count n_sampled, which the step advances in step with j."""
        bt = self.batch
        ints, floats = self._pack(items, self.max_rows, by_row=True)
        self._staging.copy(ints, bt.ints)
        self._staging.copy(floats, bt.floats)
        bt.k_max = self._k_max(items)
        want = [k for k, it in enumerate(items) if it.req.want_logits]
        bt.want = (self._staging.copy(torch.tensor(want)), want) if want else None
        self._batch_dirty = False

    @staticmethod
    def _keep_logprobs(items: list[_Request], guided: torch.Tensor, idx: torch.Tensor, want: list[int]) -> None:
        logprobs = torch.log_softmax(guided[idx], dim=-1)  # one batched log-softmax, not one per request
        for i, k in enumerate(want):
            items[k].logprobs.append(logprobs[i])

    def _decode(self, running: list[_Request]) -> None:
        n_rows = sum(len(it.allocs) for it in running)
        t0 = time.perf_counter()
        if self._batch_dirty:
            self._load_batch(running)
        self.runner.decode(n_rows, self.batch, self.batch.k_max)  # model step + sampling + feeding
        per_step = self.cfg.n_layer * self.cfg.kv_heads  # slots one full sequence overwrites per step
        spilling = []
        for it in running:  # host mirror of the slots each sequence holds, and eviction stats
            it.n_sampled += 1  # as the step advanced j on the device
            for s, a in enumerate(it.allocs):
                if it.n_stored[s] >= it.cache.budget:
                    it.stats.evictions += per_step
                    self.stats_.evictions_total += per_step
                    if len(it.spill[s].entries) < self.spill_steps_per_seq:
                        spilling.append((a.row, it.spill[s]))
                else:
                    it.n_stored[s] += 1
                it.stats.peak_kv_tokens = max(it.stats.peak_kv_tokens, it.n_stored[s])
        if spilling:
            self._spill_step(spilling)
        if self.batch.want is not None:
            self._keep_logprobs(running, self.batch.guided, *self.batch.want)
        self._after_tokens(running)
        dt = time.perf_counter() - t0
        for fn in self.step_listeners:
            fn(dt, n_rows)

    def _after_tokens(self, items: list[_Request]) -> None:
        grid, total = self.cfg.grid_size, self.cfg.block_size
        self.stats_.tokens_total += len(items)
        for it in items:
            try:
                if self.fault_hook is not None:
                    self.fault_hook(it.request_id)
                n = it.n_sampled
                if n == total:
                    self._complete(it)
                    continue
                if n % grid == 0:
                    it.sink(Progress(n, total))
                    rows_done = n // grid
                    k = it.req.preview_every_rows
                    if k and rows_done % k == 0:
                        self._preview(it, rows_done)
                sp = it.req.sampling
                if it.cfg_pair and sp.cfg_interval >= 0 and not sp.cfg_active(n):
                    # guidance is over for this request: the unconditional branch is dead weight
                    self.runner.clear_row(it.allocs[1].row)
                    self.scheduler.release(it, 1)
                    it.n_stored = it.n_stored[:1]
                    self._batch_dirty = True
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
                self._fail(it, RequestFailed(f"request failed: {e}"), "error")

    # --- results ---------------------------------------------------------------------------------
    def _complete(self, it: _Request) -> None:
        it.stats.run_s = time.monotonic() - it.started
        logprobs = torch.stack(it.logprobs).cpu() if it.logprobs else None
        # a device-side copy: the slot may be reused before the image stage reads it
        self._done.append(DoneImage(it.sink, self.codes[it.slot].clone(), it.stats, logprobs))
        self.stats_.images_total += 1
        self._finish(it, None, "ok")

    def _preview(self, it: _Request, rows_done: int) -> None:
        grid = self.cfg.grid_size
        codes = self.codes[it.slot].clone()
        codes[rows_done * grid:] = 0
        self.images.preview(it.sink, codes, it.n_sampled, rows_done, rows_done * (self.models.image_size // grid))

    # --- spill and swap ----------------------------------------------------------------------------
    def _spill_step(self, spilling: list[tuple[int, SpillRecord]]) -> None:
        """One gather + one async copy for every sequence that overwrote slots this step."""
        rows = self.runner.rows
        idx = self._staging.copy(torch.tensor([r for r, _ in spilling]))
        recs = [rec for _, rec in spilling]
        before = [rec.bytes for rec in recs]
        self.spill.store(rows.spill_k, rows.spill_v, rows.spill_pos, idx, recs)
        self.stats_.spilled_bytes_total += sum(rec.bytes - b for rec, b in zip(recs, before))

    def _swap_out(self, item: _Request) -> None:
        saved = []
        for a in item.allocs:
            saved.append((self.runner.pool.read_pages(a.pages), self.runner.save_row(a.row)))
        item.swap_data = [(_to_cpu(p), [t.cpu() for t in r]) for p, r in saved]
        n_seqs = len(item.allocs)
        for a in self.scheduler.release(item):
            self.runner.clear_row(a.row)
        item.n_seqs = n_seqs
        item.stats.swapped_out += 1
        self.stats_.swapped_out_total += 1
        self.scheduler.enqueue(item, requeue=True)
        self._batch_dirty = True

    def _swap_in(self, item: _Request) -> None:
        for a, (pages, row_state) in zip(item.allocs, item.swap_data):
            self.runner.pool.write_pages(a.pages, pages)
            self.runner.restore_row(a.row, row_state)
            bt = self.runner.rows.block_table[a.row]
            bt.zero_()
            bt[: len(a.pages)] = torch.tensor(a.pages, dtype=torch.int32, device=self.device)
        item.swap_data = None
        self._batch_dirty = True

    # --- info ----------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.stats_
        s.running = len(self.scheduler.running)
        s.waiting = self.scheduler.num_waiting
        used_pages = self.scheduler.allocator.num_usable - self.scheduler.allocator.num_free
        s.kv_used_tokens = used_pages * self.config.page_size
        return EngineStats(**{**s.__dict__, "requests_total_by_status": dict(s.requests_total_by_status)})

    def close(self) -> None:
        self.images.close()


class _Staging:
    """Host-to-device copies without a host sync: a copy from pageable memory waits for the GPU, so
    values go through a ring of pinned buffers, each reused only after its copy ran."""

    def __init__(self, device: torch.device, n: int = 8):
        self.device = device
        self.ring: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        if device.type == "cuda":
            self.ring = [(torch.empty(0, dtype=torch.uint8), None) for _ in range(n)]
        self.next = 0

    def copy(self, src: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        """src (host) into dst on the device (a new tensor if None); returns it."""
        if self.device.type != "cuda":
            return src.to(self.device) if dst is None else dst.copy_(src)
        k = self.next = (self.next + 1) % len(self.ring)
        buf, ev = self.ring[k]
        if ev is not None:
            ev.synchronize()  # only waits if the GPU is a whole ring behind
        nbytes = src.numel() * src.element_size()
        if buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 2 * buf.numel()), dtype=torch.uint8, pin_memory=True)
        staged = buf[:nbytes].view(src.dtype).view(src.shape).copy_(src)
        out = staged.to(self.device, non_blocking=True) if dst is None else dst.copy_(staged, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.ring[k] = (buf, ev)
        return out


def _to_cpu(groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[t.to("cpu", non_blocking=False) for t in g] for g in groups]
