"""An in-process stand-in for the engine client (adsa_core.engine.client.EngineClient), for fast unit tests
of the HTTP layer. The type checker holds it to the same Protocol as the real ProcessEngineClient.

It honours the engine contract the server relies on (all-or-nothing submit errors, events, cancel,
deadlines, stats, step listeners, drain, death, `last_heard_at`) with a tiny batched "decode" loop on the
event loop: each step advances every running image by one token. Images are small PNGs that depend only
on (label, seed), like the real engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import torch
from PIL import Image

from adsa_core.engine.client import EngineClient, RequestHandle
from adsa_core.engine.request import (
    DeadlineExceeded,
    EngineDead,
    EngineDraining,
    EngineStats,
    Finished,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    PartialImage,
    Progress,
    QueueFull,
    RequestCancelled,
    RequestFailed,
    RequestStats,
)
from adsa_core.engine.step_clock import StepTiming
from server import Settings, create_app


def png_for(label: int, seed: int, rows: int, grid: int) -> bytes:
    img = Image.new("RGB", (grid * 2, max(1, rows) * 2), ((label * 37) % 256, (seed * 91) % 256, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Seq:
    req: GenerationRequest
    handle: RequestHandle
    done: int = 0
    started: float | None = None
    cancelled: bool = False
    finished: bool = False


class FakeEngine:
    def __init__(
        self,
        tokens: int = 16,
        step_s: float = 0.002,
        max_batch_size: int = 8,
        max_queue: int = 64,
        num_classes: int = 10,
        model_type: str = "c2i",
        fail_labels: tuple[int, ...] = (),
        decoder: bool = True,
    ):
        self.grid = math.isqrt(tokens)
        self.tokens, self.step_s, self.max_queue, self.max_batch_size = tokens, step_s, max_queue, max_batch_size
        self.fail_labels = fail_labels
        self.decoder = decoder  # False: finished images carry token ids alone, as a server without a VQ
        self.submitted = 0  # requests accepted so far
        self.info: ModelInfo | None = ModelInfo(
            name="fake-demo",
            model_type=model_type,
            image_size=self.grid * 16,
            num_classes=num_classes if model_type == "c2i" else 0,
            classes=[{"id": i, "name": f"class{i}", "emoji": "*"} for i in range(num_classes)]
            if model_type == "c2i"
            else None,
            policies=("dense", "adsa", "window"),
            default_policy="adsa",
            default_budget=8,
            min_budget=6,  # a number below the default: the fake never resolves a budget
            seq_len=(1 if model_type == "c2i" else 120) + tokens - 1,  # condition + image tokens - 1, as the real one
            max_batch_size=max_batch_size,
            max_images_per_call=max_queue + max_batch_size,
            sampling_defaults={"cfg_scale": 4.0, "temperature": 1.0},
            kv_cache_dtype="float32",
            kv_pool_bytes=65536,
            has_text_encoder=model_type == "t2i",
            has_decoder=decoder,
        )
        self.ready = False
        self.draining = False
        self.alive = True
        self.warmup_s = 0.0
        self.on_dead: Callable[[str], None] = lambda reason: None
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.listeners: list[Callable[[StepTiming], None]] = []
        self.by_status: dict[str, int] = {}
        self.images = self.tokens_total = 0
        self.batch_sizes: list[int] = []
        self.started_at: float | None = None
        self.stalled = False  # True: the loop stops reporting (a step that hangs)
        self.last_heard_at = time.monotonic()  # like the real client's: refreshed every turn of the loop
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())
        self.ready = True

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        self.draining = True
        if drain:

            async def idle() -> None:
                while self.running or self.waiting:
                    await asyncio.sleep(self.step_s)

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(idle(), timeout)
        self.abandon()

    def abandon(self) -> None:
        self.draining, self.ready = True, False
        for s in self.running + self.waiting:
            self._end(s, "cancelled", RequestCancelled("engine stopped"))
        self.running, self.waiting = [], []
        if self._task is not None:
            self._task.cancel()

    async def submit(self, reqs: list[GenerationRequest]) -> list[RequestHandle]:
        """All or nothing, like the real engine core."""
        assert self.info is not None
        if not self.alive:
            raise EngineDead("the engine process is not running")
        if self.draining:
            raise EngineDraining("draining")
        if len(self.waiting) + len(reqs) > self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests waiting")
        for req in reqs:
            if self.info.model_type == "c2i" and not (
                isinstance(req.condition, int) and 0 <= req.condition < self.info.num_classes
            ):
                raise InvalidRequest(f"class label {req.condition!r} is outside 0..{self.info.num_classes - 1}",
                                     "condition")
            if self.info.model_type == "c2i" and req.prompt is not None:
                raise InvalidRequest("this is a class-conditional model: give a class label, not a prompt", "condition")
            if req.cache is not None and req.cache.budget == 7:  # a budget the fake engine calls impossible
                raise InvalidRequest("kv budget 7 tokens must be larger than prefix + local window", "cache")
        seqs = [_Seq(req, RequestHandle(req.request_id, self._cancel)) for req in reqs]
        self.waiting.extend(seqs)
        self.submitted += len(seqs)
        return [s.handle for s in seqs]

    def _cancel(self, request_id: str) -> None:
        for s in self.waiting + self.running:
            if s.req.request_id == request_id and not s.finished:
                s.cancelled = True

    def die(self, reason: str = "the engine process exited with code -9") -> None:
        """What the real client does when the core process dies."""
        self.alive = self.ready = False
        for s in self.running + self.waiting:
            self._end(s, "dead", EngineDead(reason))
        self.running, self.waiting = [], []
        self.on_dead(reason)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.running),
            waiting=len(self.waiting),
            kv_capacity_tokens=1024,
            kv_used_tokens=sum(s.done for s in self.running),
            swapped_out_total=2,
            images_total=self.images,
            tokens_total=self.tokens_total,
            requests_total_by_status=dict(self.by_status),
        )

    def add_step_listener(self, fn: Callable[[StepTiming], None]) -> None:
        self.listeners.append(fn)

    # --- the "decode loop"

    def _end(self, s: _Seq, status: str, ev: Any) -> None:
        s.finished = True
        self.by_status[status] = self.by_status.get(status, 0) + 1
        s.handle.deliver(ev)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            if self.stalled:
                continue
            now = self.last_heard_at = time.monotonic()
            for s in list(self.waiting) + list(self.running):
                if s.cancelled:
                    self._end(s, "cancelled", RequestCancelled("cancelled"))
                elif s.req.deadline is not None and now > s.req.deadline:
                    self._end(s, "deadline_exceeded", DeadlineExceeded("deadline passed"))
            self.waiting = [s for s in self.waiting if not s.finished]
            self.running = [s for s in self.running if not s.finished]
            while self.waiting and len(self.running) < self.max_batch_size:
                s = self.waiting.pop(0)
                s.started = now
                self.running.append(s)
            if not self.running:
                continue
            self.batch_sizes.append(len(self.running))
            for fn in self.listeners:
                fn(StepTiming(self.step_s, self.step_s, len(self.running)))
            for s in list(self.running):
                s.done += 1
                self.tokens_total += 1
                label = s.req.condition if isinstance(s.req.condition, int) else 0
                if s.req.progress:
                    s.handle.deliver(Progress(s.done, self.tokens))
                k = s.req.preview_every_rows
                if k and s.done % (k * self.grid) == 0 and s.done < self.tokens:
                    rows = s.done // self.grid
                    s.handle.deliver(PartialImage(s.done, rows, None, png_for(label, s.req.seed, rows, self.grid)))
                if s.done == self.tokens:
                    self.running.remove(s)
                    if label in self.fail_labels:
                        self._end(s, "failed", RequestFailed("simulated failure"))
                        continue
                    self.images += 1
                    started = now if s.started is None else s.started  # admitted before it ran
                    stats = RequestStats(
                        queue_s=started - s.req.arrival,
                        run_s=now - started,
                        kv_budget_tokens=8,
                        peak_kv_tokens=8,
                        evictions=3,
                    )
                    codes = torch.full((self.tokens,), s.req.seed % 7)
                    self._end(
                        s,
                        "finished",
                        Finished(codes, None, stats, png=png_for(label, s.req.seed, self.grid, self.grid)
                                 if self.decoder else None),
                    )


_: type[EngineClient] = FakeEngine  # the type checker holds the fake to the server's Protocol


@asynccontextmanager
async def fake_client(
    settings: Settings | None = None, headers: dict | None = None, **engine_kw
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine]]:
    """The app with a FakeEngine, lifespan running, and an httpx client over ASGI."""
    engine = FakeEngine(**engine_kw)
    app = create_app(settings or Settings(_env_file=None), engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            yield client, engine
