"""An in-process stand-in for adsa_core's AsyncEngine, for fast unit tests of the HTTP layer.

It honours the engine contract the server relies on (submit errors, events, cancel, deadlines,
stats, step listeners, drain) with a tiny batched "decode" loop on the event loop: each step
advances every running image by one token. Images are small PNGs that depend only on
(label, seed), like the real engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import torch
from PIL import Image

from adsa_core.engine.request import (
    DeadlineExceeded,
    EngineDraining,
    Finished,
    GenerationRequest,
    InvalidRequest,
    PartialImage,
    Progress,
    QueueFull,
    RequestCancelled,
    RequestFailed,
    RequestStats,
)
from server import Settings, create_app


def png_for(label: int, seed: int, rows: int, grid: int) -> bytes:
    img = Image.new("RGB", (grid * 2, max(1, rows) * 2), ((label * 37) % 256, (seed * 91) % 256, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Seq:
    req: GenerationRequest
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: int = 0
    started: float | None = None
    cancelled: bool = False
    finished: bool = False


class FakeHandle:
    def __init__(self, engine: FakeEngine, seq: _Seq):
        self.engine, self.seq = engine, seq
        self.request_id = seq.req.request_id

    async def events(self) -> AsyncIterator[Any]:
        while True:
            ev = await self.seq.queue.get()
            if isinstance(ev, BaseException):
                raise ev
            yield ev
            if isinstance(ev, Finished):
                return

    def cancel(self) -> None:
        if not self.seq.finished:
            self.seq.cancelled = True


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
    ):
        self.grid = math.isqrt(tokens)
        self.tokens, self.step_s, self.max_queue = tokens, step_s, max_queue
        self.fail_labels = fail_labels
        self.info = SimpleNamespace(
            name="fake-demo",
            model_type=model_type,
            image_size=self.grid * 16,
            num_classes=num_classes if model_type == "c2i" else None,
            classes=[{"id": i, "name": f"class{i}", "emoji": "*"} for i in range(num_classes)]
            if model_type == "c2i"
            else None,
            policies=["dense", "adsa", "window"],
            default_policy="adsa",
            default_budget=0.5,
            max_batch_size=max_batch_size,
            sampling_defaults={"cfg_scale": 4.0, "temperature": 1.0},
        )
        self.ready = False
        self.draining = False
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.listeners: list[Callable[[float, int], None]] = []
        self.by_status: dict[str, int] = {}
        self.images = self.tokens_total = 0
        self.batch_sizes: list[int] = []
        self.started_at: float | None = None
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
        for s in self.running + self.waiting:
            self._end(s, "cancelled", RequestCancelled("engine stopped"))
        self.running, self.waiting = [], []
        if self._task is not None:
            self._task.cancel()

    def submit(self, req: GenerationRequest) -> FakeHandle:
        if self.draining:
            raise EngineDraining("draining")
        if self.info.model_type == "c2i" and not (
            isinstance(req.condition, int) and 0 <= req.condition < self.info.num_classes
        ):
            raise InvalidRequest(f"bad class label {req.condition!r}")
        if req.cache is not None and req.cache.budget == 7:  # a budget the fake engine calls impossible
            raise InvalidRequest("kv budget 7 tokens must be larger than prefix + local window")
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests waiting")
        seq = _Seq(req)
        self.waiting.append(seq)
        return FakeHandle(self, seq)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.info.model_type != "t2i":
            raise InvalidRequest("not a text model")
        return torch.zeros(len(prompts), 120, 8), torch.ones(len(prompts), 120, dtype=torch.bool)

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(
            running=len(self.running),
            waiting=len(self.waiting),
            kv_capacity_tokens=1024,
            kv_used_tokens=sum(s.done for s in self.running),
            evictions_total=0,
            spilled_bytes_total=0,
            images_total=self.images,
            tokens_total=self.tokens_total,
            requests_total_by_status=dict(self.by_status),
        )

    def add_step_listener(self, fn: Callable[[float, int], None]) -> None:
        self.listeners.append(fn)

    # --- the "decode loop"

    def _end(self, s: _Seq, status: str, ev: Any) -> None:
        s.finished = True
        self.by_status[status] = self.by_status.get(status, 0) + 1
        s.queue.put_nowait(ev)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            now = time.monotonic()
            for s in list(self.waiting) + list(self.running):
                if s.cancelled:
                    self._end(s, "cancelled", RequestCancelled("cancelled"))
                elif s.req.deadline is not None and now > s.req.deadline:
                    self._end(s, "deadline_exceeded", DeadlineExceeded("deadline passed"))
            self.waiting = [s for s in self.waiting if not s.finished]
            self.running = [s for s in self.running if not s.finished]
            while self.waiting and len(self.running) < self.info.max_batch_size:
                s = self.waiting.pop(0)
                s.started = now
                self.running.append(s)
            if not self.running:
                continue
            self.batch_sizes.append(len(self.running))
            for fn in self.listeners:
                fn(self.step_s, len(self.running))
            for s in list(self.running):
                s.done += 1
                self.tokens_total += 1
                label = s.req.condition if isinstance(s.req.condition, int) else 0
                s.queue.put_nowait(Progress(s.done, self.tokens))
                k = s.req.preview_every_rows
                if k and s.done % (k * self.grid) == 0 and s.done < self.tokens:
                    rows = s.done // self.grid
                    s.queue.put_nowait(PartialImage(s.done, rows, png_for(label, s.req.seed, rows, self.grid)))
                if s.done == self.tokens:
                    self.running.remove(s)
                    if label in self.fail_labels:
                        self._end(s, "failed", RequestFailed("simulated failure"))
                        continue
                    self.images += 1
                    stats = RequestStats(
                        queue_s=s.started - s.req.arrival,
                        run_s=now - s.started,
                        kv_budget_tokens=8,
                        peak_kv_tokens=8,
                        evictions=3,
                    )
                    codes = torch.full((self.tokens,), s.req.seed % 7)
                    self._end(
                        s,
                        "finished",
                        Finished(codes, png_for(label, s.req.seed, self.grid, self.grid), stats),
                    )


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
