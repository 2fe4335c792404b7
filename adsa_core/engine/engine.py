"""The synchronous engine: each step is schedule -> execute -> update.

Single-threaded by design: the engine-core process (`core.py`) runs it in a busy loop, offline tools
call it directly. Requests of any condition, sampling settings, policy and budget share one batch; a
CFG request is two rows (conditional, unconditional) that share one sample per step.

  schedule  the scheduler returns a StepPlan over row, page and slot ids (plain Python);
  execute   the runner applies it (the only writer of block tables and the KV pool), starts the newly
            admitted requests (a c2i row feeds its class label through the decode step; t2i prefills its
            caption) and runs the decode step: model + sampling, one CUDA graph replay on GPU;
  update    host bookkeeping only: the mirror of each sequence's stored slots, eviction and spill stats,
            progress, previews, retirement; then the image stage delivers decoded chunks and launches more.

Nothing in a c2i step waits for the GPU (host values go through the runner's pinned staging ring), so the
host prepares the next step while the GPU runs this one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch

from ..config import EngineConfig
from ..kv.pool import PageAllocator, pages_for
from ..kv.spill import SpillArena, SpillRecord
from ..loading import LoadedModels, limit_cpu_threads
from .capacity import default_max_batch, pool_geometry
from .imaging import DoneImage, ImageStage, Preview
from .request import (
    DeadlineExceeded,
    EngineError,
    EngineRequest,
    EngineStats,
    Event,
    GenerationRequest,
    InvalidRequest,
    Progress,
    QueueFull,
    RequestCancelled,
    RequestFailed,
    Sink,
)
from .runner import ModelRunner
from .sampler import Sampler, uses_sampling_kernel
from .scheduler import Scheduler, StepPlan
from .step_clock import StepClock, StepTiming
from .validation import check_submission_size, encode_prompts, validate_request

log = logging.getLogger("adsa.engine")


class Engine:
    def __init__(self, models: LoadedModels, config: EngineConfig):
        self.models, self.config = models, config
        if models.device.type == "cpu":
            limit_cpu_threads()  # torch's thread count is per OS thread: this is the engine's
        self.gpt, self.cfg, self.device = models.gpt, models.gpt_config, models.device
        self.default_cache = config.default_cache.resolve(self.cfg)
        geo = pool_geometry(config, self.cfg, self.gpt.dtype, self.device)
        self.max_batch_size = config.max_batch_size or default_max_batch(geo, self.default_cache, self.device)
        self.max_rows = 2 * self.max_batch_size
        compiled = self.device.type == "cuda" and config.compile_step is not False  # None: auto, on for CUDA
        self.runner = ModelRunner(self.gpt, geo, self.max_rows, pages_for(self.cfg.seq_len, config.page_size),
                                  config.cuda_graphs, compiled)
        self.scheduler = Scheduler(PageAllocator(geo.num_pages), self.max_rows, self.max_batch_size,
                                   config.page_size, config.max_queue)
        self.sampler = Sampler(self.max_batch_size, self.max_rows, self.cfg.vocab_size, self.cfg.block_size,
                               self.runner.rows, self.cfg.cls_token_num, self.runner.staging)
        self.images = ImageStage(models.vq if config.decode_images else None, self.device, config.vq_decode_batch,
                                 compile_decode=compiled, autotune=config.vq_autotune, on_outcome=self._count_image)
        self.spill = SpillArena(config.spill_arena_bytes, geo.n_layer, geo.kv_heads, geo.head_dim, geo.dtype,
                                self.device)
        self.spill_steps_per_seq = config.spill_limit_bytes // self.spill.step_bytes
        self.requests: dict[str, EngineRequest] = {}
        self._ids = itertools.count()
        self._done: list[DoneImage] = []  # finished this step, handed to the image stage together
        self.clock = StepClock(self.device)
        self.step_listeners: list[Callable[[StepTiming], None]] = []
        self.fault_hook: Callable[[str], None] | None = None  # tests inject per-request failures here
        self.stats_ = EngineStats(kv_capacity_tokens=geo.capacity_tokens, max_batch_size=self.max_batch_size,
                                  kv_pool_bytes=geo.num_pages * geo.bytes_per_page)

    # --- submission: validated once, all or nothing ------------------------------------------------
    def submit(self, req: GenerationRequest, sink: Sink) -> str:
        """Queue one request; raises InvalidRequest or QueueFull (nothing is changed then)."""
        return self.submit_all([req], [sink])[0]

    def submit_all(self, reqs: list[GenerationRequest], sinks: list[Sink]) -> list[str]:
        """Queue requests together or not at all (one HTTP call's images). Raises InvalidRequest or QueueFull."""
        try:
            check_submission_size(len(reqs), self.scheduler.queue_capacity)  # before the 429: no wait would help
            if len(reqs) > self.scheduler.queue_room:  # refusals are outcomes too (adsa_requests_total)
                self.stats_.count("rejected", len(reqs))
                waiting = self.scheduler.num_waiting
                raise QueueFull(f"{waiting} {'image is' if waiting == 1 else 'images are'} waiting and this request "
                                f"adds {len(reqs)} (room for {self.scheduler.queue_room})")
            encode_prompts(reqs, self.cfg, self.models.text_encoder)  # after the queue check: refusals cost nothing
            caches = [validate_request(r, self.cfg, self.default_cache, self.scheduler.fits_ever) for r in reqs]
        except InvalidRequest:
            self.stats_.count("invalid", len(reqs))
            raise
        ids = []
        for req, sink, cache in zip(reqs, sinks, caches):
            rid = req.request_id or f"req-{next(self._ids)}"
            item = EngineRequest(priority=req.priority, n_seqs=2 if req.sampling.uses_cfg else 1, cache=cache,
                                 req=req, sink=sink, request_id=rid)
            item.stats.kv_budget_tokens = cache.budget
            self.scheduler.enqueue(item)
            self.requests[rid] = item
            ids.append(rid)
        return ids

    def cancel(self, request_id: str) -> None:
        if (item := self.requests.get(request_id)) is not None:
            item.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.requests) or self.images.busy

    # --- the step ------------------------------------------------------------------------------------
    def step(self) -> None:
        t0 = time.perf_counter()
        try:
            if self.requests:
                self._step()
        finally:
            self.images.finish(self._done)
            self._done = []
            # nothing else to do: wait for the last images; requests waiting: the GPU is the bottleneck
            self.images.poll(wait=not self.requests, saturated=self.scheduler.num_waiting > 0)
            self.stats_.host_busy_s_total += time.perf_counter() - t0

    def _step(self) -> None:
        self._reap()
        plan = self.scheduler.schedule()
        self.runner.apply(plan)
        # the token buffers follow the request: its slot went back with its rows, another may take it now
        buffers = (self.sampler.codes, self.sampler.forced)
        for item, _, slot in plan.swap_out:
            item.swap_tokens = [buffer[slot].to("cpu", copy=True) for buffer in buffers]
            item.stats.swapped_out += 1  # type: ignore[attr-defined]  # the engine enqueues EngineRequests
            self.stats_.swapped_out_total += 1
        for item in plan.swapped_in:
            for buffer, saved in zip(buffers, item.swap_tokens):
                buffer[item.slot].copy_(saved)
            item.swap_tokens = None
        if plan.admitted:
            self._start(plan.admitted)  # type: ignore[arg-type]  # the engine enqueues only EngineRequests
            if self.scheduler.changed:  # a prefill failed, or a new request freed a row: plan again first
                return
        if plan.running:
            self._decode(plan)

    def _finish(self, item: EngineRequest, outcome: Event | EngineError | None, status: str | None) -> None:
        """Release everything a request holds and deliver its last event (if any). Status None: a finished image,
        counted once the image stage has delivered it (or failed it)."""
        self.scheduler.release(item)
        # stored slots only grow, and the conditional sequence holds the most: its count is the peak
        item.stats.peak_kv_tokens = item.n_stored[0] if item.n_stored else 0
        item.stats.spilled_bytes = sum(rec.bytes for rec in item.spill)
        for rec in item.spill:
            self.spill.release(rec)
        self.requests.pop(item.request_id, None)
        if status is not None:
            self.stats_.count(status)
        if outcome is not None:
            item.sink(outcome)

    def fail_all(self, err: EngineError, status: str) -> None:
        """Every request, waiting or running, ends with `err` (shutdown)."""
        for item in list(self.requests.values()):
            self._finish(item, err, status)

    def fail_running(self) -> list[str]:
        """A step raised: the requests in the batch end with a generic error naming their id (details are for
        the log, not for clients); waiting requests stay queued, unless the step swapped them out. Returns the
        failed ids."""
        ids = [it.request_id for it in list(self.scheduler.running)]
        # swapped out in the failed step before its state was saved: it could never resume, and would fail the
        # batch it is swapped into
        ids += [rid for rid, it in self.requests.items() if it.swapped and it.swap_tokens is None]
        for rid in ids:
            self._finish(self.requests[rid], RequestFailed(f"internal error in request {rid}"), "error")
        self.clock.reset()
        return ids

    def _reap(self) -> None:
        now = time.monotonic()
        for item in list(self.requests.values()):
            if item.cancelled:
                self._finish(item, RequestCancelled("cancelled"), "cancelled")
            elif item.req.deadline is not None and now > item.req.deadline:
                self._finish(item, DeadlineExceeded("deadline exceeded"), "deadline")

    def _start(self, items: list[EngineRequest]) -> None:
        """Newly admitted requests begin. c2i rows start at position 0 with their class label, which the next
        decode step embeds, stores and samples token 0 from (no prefill, no wait); t2i rows prefill."""
        for item in items:
            item.started = time.monotonic()
            item.stats.queue_s = item.started - item.req.arrival
            item.stats.kv_bytes = sum(len(a.pages) for a in item.allocs) * self.runner.geo.bytes_per_page
            item.spill = [SpillRecord() for _ in item.allocs]
            if item.req.forced_tokens is not None:
                self.runner.staging.copy(item.req.forced_tokens, self.sampler.forced[item.slot])
        if self.cfg.model_type != "c2i":
            self._prefill(items)
            return
        rows, labels = [], []
        for item in items:
            assert isinstance(item.req.condition, int)  # validation turned c2i conditions into labels
            for s, a in enumerate(item.allocs):  # the unconditional row: the "no class" label
                rows.append(a.row)
                labels.append(item.req.condition if s == 0 else self.cfg.num_classes)
            item.n_stored = [0] * len(item.allocs)
        self.runner.start_rows(rows, labels)

    def _prefill(self, items: list[EngineRequest]) -> None:
        """t2i: caption tokens of newly admitted requests into their rows, then their token 0. A failure fails
        these requests only (the next plan compacts their rows)."""
        rows, conds, masks = [], [], []
        for item in items:
            c = item.req.condition
            assert isinstance(c, torch.Tensor)  # validation encoded the prompt into caption features
            cond = c.to(self.device)
            mask = (item.req.emb_mask if item.req.emb_mask is not None else torch.ones(self.cfg.cls_token_num)).bool()
            rows.append(item.allocs[0].row)
            conds.append(cond)
            masks.append(mask)
            if len(item.allocs) == 2:  # the unconditional branch uses the prompt's mask too, as LlamaGen
                rows.append(item.allocs[1].row)
                conds.append(self.gpt.null_condition(cond.unsqueeze(0))[0])
                masks.append(mask)
        try:
            with torch.no_grad():
                emb = self.gpt.embed_condition(torch.stack(conds))  # (n, T_cond, dim)
                valid = torch.stack(masks).to(self.device)
                logits = self.runner.prefill(rows, emb, valid)  # (n, V)
        except Exception:  # noqa: BLE001 - a bad prefill fails these requests, not the engine
            log.exception("prefill failed for requests %s", ", ".join(it.request_id for it in items))
            for item in items:
                self._finish(item, RequestFailed(f"prefill failed for request {item.request_id}"), "error")
            return
        counts = iter(valid.sum(1).tolist())
        for item in items:
            item.n_stored = [next(counts) for _ in item.allocs]
        for k, lp in self.sampler.first_tokens(items, logits, [k for k, it in enumerate(items) if it.req.want_logits]):
            items[k].logprobs.append(lp)
        for it in items:
            it.n_sampled += 1
        self._after_tokens(items)

    def _decode(self, plan: StepPlan) -> None:
        running: list[EngineRequest] = plan.running  # type: ignore[assignment]  # the engine enqueues only these
        if plan.batch_changed:
            self.sampler.load(running, [k for k, it in enumerate(running) if it.req.want_logits])
        t0 = self.clock.start()
        self.runner.decode(plan.n_rows, self.sampler, self.sampler.k_max)  # model step + sampling + feeding
        for timing in self.clock.end(t0, plan.n_rows):
            for fn in self.step_listeners:
                fn(timing)
        self._account_kv(running)
        for k, lp in self.sampler.logprobs():
            running[k].logprobs.append(lp)
        self.stats_.steps_total += 1
        self.stats_.last_step_at = time.monotonic()
        self._after_tokens(running)

    def _account_kv(self, running: list[EngineRequest]) -> None:
        """Host mirror of the slots each sequence holds, eviction stats, and the spill of what was overwritten.
        Runs every step over every sequence: kept to plain int work (the peak is read at the end)."""
        per_step = self.cfg.n_layer * self.cfg.kv_heads  # slots one full sequence overwrites per step
        limit = self.spill_steps_per_seq
        rows, recs, evicting = [], [], 0
        for it in running:
            it.n_sampled += 1  # as the step advanced j on the device
            budget, stored = it.cache.budget, it.n_stored
            for s in range(len(stored)):
                if stored[s] < budget:
                    stored[s] += 1
                    continue
                evicting += 1
                it.stats.evictions += per_step
                rec = it.spill[s]
                if len(rec.entries) < limit:
                    rows.append(it.allocs[s].row)
                    recs.append(rec)
        self.stats_.evictions_total += evicting * per_step
        if recs:  # one gather + one async copy for every sequence that overwrote slots this step
            before = sum(rec.bytes for rec in recs)
            r = self.runner.rows
            self.spill.store(r.spill_k, r.spill_v, r.spill_pos, self.runner.staging.copy(torch.tensor(rows)), recs)
            self.stats_.spilled_bytes_total += sum(rec.bytes for rec in recs) - before

    def _after_tokens(self, items: list[EngineRequest]) -> None:
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
                    if it.req.progress:
                        it.sink(Progress(n, total))
                    rows_done, k = n // grid, it.req.preview_every_rows
                    if k and rows_done % k == 0:
                        self._preview(it, rows_done)
                sp = it.req.sampling
                if len(it.allocs) == 2 and sp.cfg_interval >= 0 and not sp.cfg_active(n):
                    # guidance is over for this request: the unconditional branch is dead weight
                    self.scheduler.release(it, 1)
                    it.n_stored = it.n_stored[:1]
            except Exception:  # noqa: BLE001 - one request's failure must not stop the others
                log.exception("request %s failed", it.request_id)  # details for the log, not for the client
                self._finish(it, RequestFailed(f"internal error in request {it.request_id}"), "error")

    # --- results ---------------------------------------------------------------------------------
    def _complete(self, it: EngineRequest) -> None:
        it.stats.run_s = time.monotonic() - it.started
        logprobs = torch.stack(it.logprobs).cpu() if it.logprobs else None
        # a device-side copy: the slot may be reused before the image stage reads it
        self._done.append(DoneImage(it.sink, self.sampler.codes[it.slot].clone(), it.stats, logprobs))
        self._finish(it, None, None)  # counted when the image stage has delivered it, or failed it

    def _count_image(self, ok: bool) -> None:
        self.stats_.count("ok" if ok else "error")
        if ok:
            self.stats_.images_total += 1

    def _preview(self, it: EngineRequest, rows_done: int) -> None:
        grid = self.cfg.grid_size
        codes = self.sampler.codes[it.slot].clone()
        codes[rows_done * grid:].fill_(0)
        self.images.preview(Preview(it.sink, codes, it.n_sampled, rows_done,
                                    rows_done * (self.models.image_size // grid)))

    # --- info ----------------------------------------------------------------------------------------
    def capture_graphs(self) -> int:
        """Capture the decode step's CUDA graph for every batch bucket before serving. Only with the Triton
        sampler, whose graphs do not depend on the batch's top-k; the torch sampler's are captured on first use."""
        return self.runner.capture_all(self.sampler, 0) if uses_sampling_kernel(self.device) else 0

    def stats(self) -> EngineStats:
        s = self.stats_
        s.running = len(self.scheduler.running)
        s.waiting = self.scheduler.num_waiting
        s.kv_used_tokens = (self.scheduler.allocator.num_usable - self.scheduler.allocator.num_free) * \
            self.config.page_size
        s.spill_dropped_steps_total = self.spill.dropped_steps
        s.image_chunks_total = self.images.chunks_launched
        return EngineStats(**{**s.__dict__, "requests_total_by_status": dict(s.requests_total_by_status)})

    def close(self) -> None:
        self.images.close()
