"""asyncio front of the engine: the engine loop runs on its own thread, so the event loop
(HTTP) stays responsive however busy the GPU is. Submissions and cancellations cross
into the engine thread through an inbox; events come back through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from ..config import POLICIES, EngineConfig
from ..loading import LoadedModels
from .engine import Engine, EngineStats
from .request import (
    EngineDraining,
    EngineError,
    Event,
    Finished,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    RequestFailed,
)

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    name: str
    model_type: str
    image_size: int
    num_classes: int
    classes: list[dict] | None
    policies: tuple[str, ...]
    default_policy: str
    default_budget: int  # tokens per sequence
    seq_len: int  # tokens a sequence holds without eviction
    max_batch_size: int
    has_decoder: bool  # False: results carry tokens only (no VQ decoder was loaded)
    sampling_defaults: dict = field(default_factory=dict)


class RequestHandle:
    """One submitted image: iterate `events()` until Finished (or an EngineError is raised)."""

    def __init__(self, request_id: str, engine: AsyncEngine):
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self.done = False

    def _deliver(self, item: Event | EngineError) -> None:
        self._queue.put_nowait(item)

    async def events(self) -> AsyncIterator[Event]:
        while not self.done:
            item = await self._queue.get()
            if isinstance(item, EngineError):
                self.done = True
                raise item
            if isinstance(item, Finished):
                self.done = True
            yield item

    async def result(self) -> Finished:
        last = None
        async for ev in self.events():
            last = ev
        assert isinstance(last, Finished)
        return last

    def cancel(self) -> None:
        if not self.done:
            self._engine._post(("cancel", self.request_id))


class AsyncEngine:
    def __init__(self, models: LoadedModels, config: EngineConfig):
        self.models = models
        self.config = config
        self.engine: Engine | None = None
        self.ready = False
        self.draining = False
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[Callable[[float, int], None]] = []
        self._stats = EngineStats()
        # submissions in flight to the engine thread = _posted - _taken; each written by one thread
        self._posted = 0
        self._taken = 0
        cfg = models.gpt_config
        default = config.default_cache.resolve(cfg)
        self.info = ModelInfo(
            name=models.name, model_type=cfg.model_type, image_size=models.image_size,
            num_classes=cfg.num_classes if cfg.model_type == "c2i" else 0, classes=models.classes,
            policies=POLICIES, default_policy=default.policy, default_budget=default.budget,
            seq_len=cfg.seq_len, max_batch_size=config.max_batch_size, has_decoder=models.vq is not None,
            sampling_defaults=dict(models.sampling_defaults),
        )

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        started = asyncio.Event()
        error: list[BaseException] = []

        def run() -> None:
            try:
                self.engine = Engine(self.models, self.config)
                for fn in self._listeners:
                    self.engine.step_listeners.append(fn)
                self._warm_up()
            except BaseException as e:  # noqa: BLE001 - reported to start()
                error.append(e)
                self._loop.call_soon_threadsafe(started.set)
                return
            self.ready = True
            self._loop.call_soon_threadsafe(started.set)
            self._run()

        self._thread = threading.Thread(target=run, name="adsa-engine", daemon=True)
        self._thread.start()
        await started.wait()
        if error:
            raise error[0]

    def _warm_up(self) -> None:
        """Every batch bucket's CUDA graph, then one tiny generation, so that no request waits for lazy
        init (kernels, graph captures, compiles of new shapes)."""
        assert self.engine is not None
        t0 = time.perf_counter()
        if n := self.engine.capture_graphs():
            log.info("captured %d decode graphs in %.1f s", n, time.perf_counter() - t0)
        cfg = self.models.gpt_config
        cond = 0 if cfg.model_type == "c2i" else torch.zeros(cfg.cls_token_num, cfg.caption_dim)
        done = threading.Event()
        self.engine.submit(GenerationRequest(condition=cond, seed=0, request_id="warm-up"), lambda ev: (
            done.set() if isinstance(ev, Finished | EngineError) else None))
        while self.engine.has_work:
            self.engine.step()
        done.wait(timeout=120)
        self.engine.stats_.requests_total_by_status.clear()
        self.engine.stats_.images_total = self.engine.stats_.tokens_total = 0

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        self.draining = True
        self.ready = False
        if drain:
            loop_deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
            while self.engine is not None and self.engine.has_work:
                if loop_deadline is not None and asyncio.get_running_loop().time() > loop_deadline:
                    break
                await asyncio.sleep(0.05)
        self._post(("abort_all",))  # whatever did not finish gets a final event, never silence
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)

    # --- engine thread ------------------------------------------------------------------------------
    def _post(self, msg: tuple) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def _run(self) -> None:
        eng = self.engine
        assert eng is not None
        while not self._stop:
            self._drain_inbox()
            if eng.has_work:
                try:
                    eng.step()
                except Exception as e:  # noqa: BLE001 - fail what was running, keep serving
                    eng.fail_all(RequestFailed(f"engine step failed: {e}"), "error")
                    if torch.cuda.is_available():  # after an OOM: hand cached blocks back before going on
                        torch.cuda.empty_cache()
                self._stats = eng.stats()
            else:
                self._stats = eng.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
        self._drain_inbox()

    def _drain_inbox(self) -> None:
        eng = self.engine
        while True:
            try:
                kind, *args = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                req, handle = args
                self._taken += 1
                sink = self._sink_for(handle)
                try:
                    eng.submit(req, sink)
                except EngineError as e:  # lost a race with the pre-checks: report through the handle
                    sink(e)
            elif kind == "cancel":
                eng.cancel(args[0])
            elif kind == "abort_all":
                eng.fail_all(EngineDraining("the server shut down before this request finished"), "aborted")

    def _sink_for(self, handle: RequestHandle) -> Callable[[Event | EngineError], None]:
        loop = self._loop

        def sink(item: Event | EngineError) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(handle._deliver, item)

        return sink

    # --- public API (event-loop thread) ---------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> RequestHandle:
        """Queue one image; raises InvalidRequest, QueueFull or EngineDraining right away."""
        if self.draining or self._stop:
            raise EngineDraining("the server is shutting down")
        if self.engine is None:
            raise EngineDraining("the engine is not started")
        if not req.request_id:
            req.request_id = f"req-{id(req):x}"
        # Checked here, on the caller's thread, so a refusal never waits for an engine step.
        self.engine.validate(req)
        waiting = self._stats.waiting + self._posted - self._taken
        if waiting >= self.config.max_queue:
            raise QueueFull(f"{waiting} requests are waiting (limit {self.config.max_queue})")
        handle = RequestHandle(req.request_id, self)
        self._posted += 1
        self._post(("submit", req, handle))
        return handle

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.models.gpt_config.model_type != "t2i":
            raise InvalidRequest("this is a class-conditional model: use class_label, not prompt")
        if self.models.text_encoder is None:
            raise InvalidRequest("this text model was started without a text encoder: prompts are unavailable")
        return self.models.text_encoder.encode(prompts)

    def stats(self) -> EngineStats:
        return self._stats

    def add_step_listener(self, fn: Callable[[float, int], None]) -> None:
        self._listeners.append(fn)
        if self.engine is not None:
            self.engine.step_listeners.append(fn)
