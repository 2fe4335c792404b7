"""The API process's side of the engine: `EngineClient` (what the server depends on) and
`ProcessEngineClient`, which runs the engine core in its own process and talks to it over ZeroMQ.

Why a process: an engine thread shares the GIL with uvicorn, JSON, base64 and PNG work, and GPT-XL steps
ran at ~19 ms served against 8 ms offline. Why ZeroMQ PUSH/PULL over ipc:// sockets with msgpack frames
(vLLM v1's choice): message framing and queueing while the other side is busy come with the library; a
message is bytes, so tensors cross as raw buffers, never pickles (docs/ARCHITECTURE.md has the measurements).

Submissions are all or nothing and acknowledged by the core, so every refusal (invalid input, a full
queue) is an exception here, before any HTTP response starts. Finished images arrive as uint8 pixels and
are PNG-encoded on a thread pool (zlib releases the GIL): on neither the engine loop nor the event loop.
If the core process dies, every request in flight ends with EngineDead at once, `alive` turns False and
`on_dead` tells the server to exit so its supervisor restarts it.

Two guards live here, on the API side, because they must hold even when the core is stalled or a
client stops reading: a request's deadline (the core's reaper enforces it; if the core says nothing by
DEADLINE_GRACE_S after it, the handle ends it itself and cancels it) and a bound on the events waiting
for a reader (MAX_PENDING_EVENTS: a reader that falls further behind is cancelled, its KV freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Protocol

import zmq
import zmq.asyncio

from ..config import ConfigError, EngineConfig
from ..loading import ModelSpec
from . import wire
from .core import IPC_DIR_PREFIX, launch_args
from .imaging import encode_png
from .request import (
    DeadlineExceeded,
    EngineDead,
    EngineDraining,
    EngineError,
    EngineStats,
    Event,
    Finished,
    GenerationRequest,
    ModelInfo,
    PartialImage,
    RequestCancelled,
    RequestFailed,
)
from .step_clock import StepTiming

log = logging.getLogger("adsa.engine")

# An image sends at most 2 events per token row (progress, preview) and its result; a reader this far
# behind has stopped reading (a legitimately slow one is absorbed by the socket buffers first).
MAX_PENDING_EVENTS = 16
# The core's reaper ends a request at its deadline within a step; the handle steps in only after this
# much more silence (a stalled or wedged core), so the normal path keeps the core's accounting.
DEADLINE_GRACE_S = 1.0


def _seconds_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline + DEADLINE_GRACE_S - time.monotonic())


class RequestHandle:
    """One submitted image: iterate `events()` until Finished (or an EngineError is raised)."""

    def __init__(self, request_id: str, cancel: Callable[[str], None], deadline: float | None = None):
        self.request_id, self.deadline = request_id, deadline
        self._cancel = cancel
        self._queue: asyncio.Queue[Event | EngineError | Awaitable[Event]] = asyncio.Queue()
        self.done = False
        self._overflowed = False

    def deliver(self, item: Event | EngineError | Awaitable[Event]) -> None:
        """An event, an error, or an event still being encoded (delivered in order all the same). A reader
        more than MAX_PENDING_EVENTS behind is cancelled: what waits is dropped, its KV freed."""
        if self._overflowed:
            return
        if self._queue.qsize() >= MAX_PENDING_EVENTS:
            self._overflowed = True
            log.warning("request %s: the client stopped reading; cancelling it", self.request_id)
            self.cancel()
            while not self._queue.empty():
                self._queue.get_nowait()
            item = RequestCancelled("the client stopped reading")
        self._queue.put_nowait(item)

    async def events(self) -> AsyncIterator[Event]:
        while not self.done:
            try:
                item = await asyncio.wait_for(self._queue.get(), _seconds_left(self.deadline))
            except asyncio.TimeoutError:  # the core did not end it: stalled or wedged
                self.cancel()
                item = DeadlineExceeded("deadline exceeded (the engine did not answer)")
            if isinstance(item, Awaitable):
                try:
                    item = await item
                except Exception:  # noqa: BLE001 - an encoding failure fails this image only
                    log.exception("encoding the image of %s failed", self.request_id)
                    item = RequestFailed(f"internal error in request {self.request_id}")
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
            self._cancel(self.request_id)


class EngineClient(Protocol):
    """What the server needs of an engine (the real one runs in its own process; tests use a fake)."""

    info: ModelInfo | None  # set once ready
    ready: bool  # loaded and warmed up, taking work
    draining: bool  # shutting down: takes no new work
    alive: bool  # False once the engine died (the server's /healthz fails then)
    # time.monotonic() of the engine's last report: it reports after every step and every 0.2 s while idle,
    # so a long silence means a step that hangs or a wedged loop (the server's /healthz fails then too)
    last_heard_at: float
    warmup_s: float  # seconds of warm-up (graph captures, compiles) at start
    on_dead: Callable[[str], None]  # called once, with the reason, when the engine dies

    async def start(self) -> None: ...

    async def submit(self, reqs: list[GenerationRequest]) -> list[RequestHandle]:
        """Queue all or none; raises InvalidRequest, QueueFull, EngineDraining or EngineDead."""
        ...

    def stats(self) -> EngineStats: ...

    def add_step_listener(self, fn: Callable[[StepTiming], None]) -> None: ...

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None: ...

    def abandon(self) -> None:
        """A forced exit: stop the engine and end every request now, waiting for nothing."""
        ...


class ProcessEngineClient:
    """The engine core in a child process (`python -m adsa_core.engine`), over ZeroMQ."""

    def __init__(self, spec: ModelSpec, config: EngineConfig, env: dict[str, str] | None = None,
                 png_threads: int = 4):
        self.spec, self.config, self.env = spec, config, env or {}
        self.info: ModelInfo | None = None
        self.ready = self.draining = False
        self.alive = True
        self.last_heard_at = 0.0
        self.warmup_s = 0.0
        self.on_dead: Callable[[str], None] = lambda reason: None
        self._stats = EngineStats()
        self._listeners: list[Callable[[StepTiming], None]] = []
        self._handles: dict[str, RequestHandle] = {}
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._batches = itertools.count()
        self._png = ThreadPoolExecutor(max_workers=png_threads, thread_name_prefix="adsa-png")
        self._proc: subprocess.Popen | None = None
        self._stopping = False
        self._started: asyncio.Future[None] | None = None
        self._reader: asyncio.Task | None = None
        self._dir = tempfile.mkdtemp(prefix=IPC_DIR_PREFIX)
        self._released = False  # the sockets and their directory are gone (_release)
        self._ctx = zmq.asyncio.Context()
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._from_core = self._ctx.socket(zmq.PULL)

    # --- life cycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the core and wait until it loaded the models and warmed up (raises if it could not)."""
        loop = asyncio.get_running_loop()
        to_core, from_core = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._to_core.setsockopt(zmq.LINGER, 0)
        self._to_core.bind(to_core)
        self._from_core.bind(from_core)
        self._started = loop.create_future()
        self._reader = asyncio.create_task(self._read(), name="adsa-engine-reader")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(launch_args(self.spec, self.config, to_core, from_core), env=env)
        threading.Thread(target=self._watch, args=(self._proc, loop), name="adsa-engine-watch", daemon=True).start()
        try:
            await self._started
        except BaseException:  # the core failed to start, or the server stops while it loads (nothing to drain)
            self._stopping = True
            try:
                if self._proc.poll() is None:
                    self._proc.kill()
                    await asyncio.to_thread(self._proc.wait)
            finally:  # also if a second signal cancels this wait: a context left to the garbage collector
                self._release()  # blocks the thread that collects it
            raise

    def _watch(self, proc: subprocess.Popen, loop: asyncio.AbstractEventLoop) -> None:
        rc = proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop closed first: nobody is left to tell
            loop.call_soon_threadsafe(self._exited, rc)

    def _exited(self, rc: int) -> None:
        if self._stopping:
            return
        reason = f"the engine process exited with code {rc}"
        log.error("%s: failing %d requests in flight", reason, len(self._handles))
        self.alive = self.ready = False
        self._fail_everything(EngineDead(reason))
        if self._started is not None and not self._started.done():
            self._started.set_exception(EngineDead(reason))
        self.on_dead(reason)

    def _fail_everything(self, err: EngineError) -> None:
        for handle in self._handles.values():
            handle.deliver(err)
        self._handles.clear()
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(err)
        self._acks.clear()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new work; with drain, let requests in flight finish (up to timeout); the rest end with
        EngineDraining; then stop the core."""
        self.draining, self.ready = True, False
        if drain and self.alive:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle(), timeout)
        if self.alive and self._proc is not None and self._proc.poll() is None:
            self._send({"t": "abort_all"})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle(), 10)  # their errors come back from the core
            self._stopping = True
            self._send({"t": "stop"})
            try:
                await asyncio.to_thread(self._proc.wait, 30)
            except subprocess.TimeoutExpired:
                log.error("the engine process did not stop: killing it")
                self._proc.kill()
        self._end_all()

    def abandon(self) -> None:
        """Kill the core, end every request, free the sockets and their directory. A shutdown under way (its
        waits are cancelled as the process exits) must not be left to do it."""
        self.draining, self.ready = True, False
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._end_all()

    def _end_all(self) -> None:
        """How every stop ends: the requests left get EngineDraining, the API side's resources are freed."""
        self._stopping = True
        self._fail_everything(EngineDraining("the server shut down before this request finished"))
        self._release()

    def _release(self) -> None:
        """The API side's resources: the reader, the sockets and their directory, the PNG threads."""
        self._released = True
        if self._reader is not None:
            self._reader.cancel()
        self._ctx.destroy(linger=0)
        self._png.shutdown(wait=False)
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _idle(self) -> None:
        while self._handles:
            await asyncio.sleep(0.05)

    # --- requests ------------------------------------------------------------------------------------
    async def submit(self, reqs: list[GenerationRequest]) -> list[RequestHandle]:
        if not self.alive:
            raise EngineDead("the engine process is not running")
        if self.draining or not self.ready:
            raise EngineDraining("the server is shutting down" if self.draining else "the engine is not started")
        batch = next(self._batches)
        ack = self._acks[batch] = asyncio.get_running_loop().create_future()
        handles = [RequestHandle(r.request_id, self._cancel, r.deadline) for r in reqs]
        for h in handles:  # registered before the core can answer, so no early event is lost
            self._handles[h.request_id] = h
        try:
            self._send({"t": "add", "batch": batch, "reqs": [wire.request_to_wire(r) for r in reqs]})
            try:
                await asyncio.wait_for(ack, _seconds_left(min((h.deadline for h in handles if h.deadline),
                                                              default=None)))
            except asyncio.TimeoutError:  # a stalled core: if it ever adds them, the abort follows the add
                self._send({"t": "abort", "ids": [h.request_id for h in handles]})
                raise DeadlineExceeded("deadline exceeded (the engine did not take the request)") from None
        except BaseException:
            for h in handles:
                self._handles.pop(h.request_id, None)
            raise
        finally:
            self._acks.pop(batch, None)
        return handles

    def _cancel(self, request_id: str) -> None:
        if self.alive and request_id in self._handles:
            self._send({"t": "abort", "ids": [request_id]})

    def _send(self, msg: dict) -> None:
        if self._released:  # after a forced exit's abandon(): the stop it cut short, or a late cancel, says nothing
            return
        self._to_core.send(wire.dumps(msg), copy=False)  # a PUSH socket queues; it never blocks here

    # --- what the core sends ---------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            msg = wire.loads(await self._from_core.recv(copy=True))
            self.last_heard_at = time.monotonic()
            try:
                self._dispatch(msg)
            except Exception:  # noqa: BLE001 - one bad message must not stop the reader
                log.exception("bad message from the engine core: %s", msg.get("t"))

    def _dispatch(self, msg: dict) -> None:
        t = msg["t"]
        if t == "out":
            for rid, kind, payload in msg["events"]:
                self._event(rid, wire.event_from_wire(kind, payload))
            if msg["stats"] is not None:
                self._stats = wire.stats_from_wire(msg["stats"])
            for timing in wire.timings_from_wire(msg["steps"]):
                for fn in self._listeners:
                    fn(timing)
        elif t == "ack":
            fut = self._acks.get(msg["batch"])
            if fut is not None and not fut.done():
                if msg["error"] is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(wire.error_from_wire(msg["error"]))
        elif t == "ready":
            self.info = ModelInfo(**{**msg["info"], "policies": tuple(msg["info"]["policies"])})
            self.warmup_s = msg["warmup_s"]
            self.ready = True
            if self._started is not None and not self._started.done():
                self._started.set_result(None)
        elif t == "fatal":
            self.alive = False
            if self._started is not None and not self._started.done():
                # a bad setting is raised as what it was in the core, for the server to say it in one line
                self._started.set_exception((ConfigError if msg.get("config") else RuntimeError)(msg["error"]))

    def _event(self, rid: str, ev: Event | EngineError) -> None:
        handle = self._handles.get(rid)
        if handle is None:  # cancelled and gone, or a late progress event after the result
            return
        if isinstance(ev, EngineError | Finished):
            del self._handles[rid]
        if isinstance(ev, Finished | PartialImage) and ev.pixels is not None:
            handle.deliver(asyncio.ensure_future(self._encoded(ev)))
        else:
            handle.deliver(ev)

    async def _encoded(self, ev: Finished | PartialImage) -> Finished | PartialImage:
        png = await asyncio.get_running_loop().run_in_executor(self._png, encode_png, ev.pixels)
        return replace(ev, png=png, pixels=None)

    # --- info ----------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self._stats

    def add_step_listener(self, fn: Callable[[StepTiming], None]) -> None:
        self._listeners.append(fn)
