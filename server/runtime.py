"""What one app instance owns: settings, metrics, the engine and its life cycle.

Loading a real checkpoint takes minutes, so it runs in a background task: /healthz answers at
once, /readyz and /v1/* say 503 until the engine is warm. The engine runs in its own process
(adsa_core.engine.client.ProcessEngineClient), so the event loop stays free for health checks,
metrics and streaming, and the engine loop never waits on HTTP work. If that process dies, requests
in flight end with 503 engine_dead, /healthz fails, and the server exits non-zero (`on_fatal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from adsa_core.config import ConfigError
from adsa_core.engine.client import EngineClient
from adsa_core.engine.request import EngineDead, EngineDraining, EngineStats

from .errors import ApiError, NotReady
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("adsa.server")


class Runtime:
    def __init__(self, settings: Settings, engine: EngineClient | None = None):
        self.settings = settings
        self.engine = engine  # the engine client once started (or the one handed to create_app)
        self.metrics = Metrics(self.engine_stats, lambda: self.engine.info if self.engine is not None else None)
        self.model_loaded_at = 0  # Unix time the engine became ready (the model object's `created`)
        self.draining = False
        self.load_error: str | None = None
        # set by __main__: exit when loading fails (status 2 for settings that cannot work, as a bad flag's)
        self.on_fatal: Callable[[str, int], None] = lambda msg, status: None
        self._latency_ewma_s = 1.0  # per-image latency estimate for Retry-After
        self._load_task: asyncio.Task | None = None
        self._stopped = False  # engine shut down (drain() ran); stop() must not do it twice
        self.created_at = time.monotonic()
        self.address = (settings.host, settings.port)  # __main__ puts the bound one here (port 0)

    # --- life cycle

    async def start(self) -> None:
        if self.engine is not None:
            await self._start_engine(self.engine)
        else:
            self._load_task = asyncio.create_task(self._load(), name="adsa-load")

    async def _load(self) -> None:
        t0 = time.monotonic()
        try:
            from adsa_core.engine.client import ProcessEngineClient

            engine = ProcessEngineClient(self.settings.model_spec(), self.settings.engine_config(),
                                         env=self.settings.engine_env())
            await self._start_engine(engine)
            self.engine = engine
            info = engine.info
            assert info is not None
            log.info("model %s on %s: KV cache %s, %.2f GiB pool, up to %d images a step; warm-up %.1f s",
                     info.name, info.device, info.kv_cache_dtype, info.kv_pool_bytes / 2**30, info.max_batch_size,
                     engine.warmup_s)
            self.metrics.warmup_seconds.set(engine.warmup_s)
            keys = len(self.settings.api_keys)  # said at every start: a typo in the keys must not open the API unseen
            need = {0: "no API key (ADSA_API_KEYS)", 1: "the API key"}.get(keys, f"one of {keys} API keys")
            log.info("/v1 routes need %s", need)
            self.metrics.start_seconds.set(time.monotonic() - t0)
            # the one line a person starting the server waits for: /readyz says 200 from now on
            elapsed = time.monotonic() - self.created_at
            log.info("ready: %s on %s in %.1f s \u2014 %s", info.name, info.device, elapsed, self.url())
        except asyncio.CancelledError:
            raise
        except ConfigError as e:  # the engine core logged it; no traceback for a setting to fix
            self.load_error = f"invalid settings for this model: {e}"
            self.on_fatal(self.load_error, 2)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading the model failed")
            self.on_fatal(self.load_error, 1)

    async def _start_engine(self, engine: EngineClient) -> None:
        engine.add_step_listener(self.metrics.on_engine_step)
        engine.on_dead = self._engine_died
        await engine.start()
        self.model_loaded_at = int(time.time())

    def _engine_died(self, reason: str) -> None:
        """The engine process is gone: requests in flight already failed; exit for the supervisor to restart."""
        self.on_fatal(reason, 1)

    async def drain(self, timeout: float | None = None, now: bool = False) -> None:
        """Refuse new work (readyz 503), let in-flight requests finish, stop the engine. now: end the requests
        in flight at once (503 draining), also when a drain is under way (it is cancelled, its engine runs)."""
        self.draining = True
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()  # a core still loading is killed, and waited for, before the server exits
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        if self.engine is not None and (now or not self._stopped):
            self._stopped = True
            await self.engine.shutdown(drain=not now, timeout=timeout)

    def abandon(self) -> None:
        """A forced exit (one signal after the stop): the engine stops and every request ends now, nothing waited
        for."""
        self.draining = self._stopped = True
        if self._load_task is not None:
            self._load_task.cancel()  # a core still loading: its start() kills it
        if self.engine is not None:
            self.engine.abandon()

    async def stop(self) -> None:
        await self.drain(self.settings.drain_timeout_s)

    def url(self) -> str:
        """Where a client on this machine reaches the server (a wildcard bind is reachable on loopback)."""
        host, port = self.address
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # --- state for routes

    @property
    def ready(self) -> bool:
        return self.engine is not None and bool(self.engine.ready) and not self.draining

    def require_engine(self) -> EngineClient:
        """The engine, if it takes work now; else the 503 that explains why not."""
        if self.engine is not None and not self.engine.alive:
            raise EngineDead("the engine process died; the server is restarting")
        if self.draining or (self.engine is not None and self.engine.draining):
            raise EngineDraining("the server is shutting down")
        if self.load_error is not None:
            raise ApiError(503, "load_failed", f"the model failed to load: {self.load_error}")
        if self.engine is None or not self.engine.ready:
            raise NotReady()
        return self.engine

    def engine_stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    def liveness_error(self) -> ApiError | None:
        """Why /healthz fails (a restart may help): the model failed to load, the engine died, or it has
        gone silent. The engine reports after every step and every 0.2 s while idle, so no report for
        ADSA_HEALTH_STALL_S means a step that hangs (work pending, no progress) or a wedged loop."""
        if self.load_error is not None:
            return ApiError(503, "load_failed", self.load_error)
        engine = self.engine
        if engine is None:  # still loading
            return None
        if not engine.alive:
            return ApiError(503, EngineDead.kind, "the engine process died")
        silent_s = time.monotonic() - engine.last_heard_at
        if engine.ready and silent_s > self.settings.health_stall_s:
            return ApiError(503, "engine_stalled", f"the engine has reported nothing for {silent_s:.0f} s")
        return None

    def observe_latency(self, seconds: float) -> None:
        self._latency_ewma_s += 0.2 * (seconds - self._latency_ewma_s)

    def retry_after_s(self) -> float:
        """A client refused with 429 should come back after about one image latency (1 .. 60 s)."""
        return min(60.0, max(1.0, self._latency_ewma_s))
