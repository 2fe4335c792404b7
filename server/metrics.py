"""Prometheus metrics: one registry per app (tests build many apps in one process).

Names follow DESIGN.md section 7 (prefix adsa_, base units, counters end in _total), plus
Prometheus's default process_* / python_* collectors and two info metrics (the model; the KV
cache configuration, like vLLM's cache_config_info) to join on by `model`.
Engine counters and gauges are read from `engine.stats()` at scrape time by a collector,
so there is no second copy of the engine's bookkeeping to drift; distributions that the
engine does not keep (latency, queue time, previews, step time, batch size) are histograms
fed by the server and by the engine's step listener (called from the engine client's reader task:
prometheus_client metrics are thread-safe).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adsa_core.engine.request import EngineStats, ModelInfo
from adsa_core.engine.step_clock import StepTiming

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# *_created series double the exposition for no use here (process-wide switch; the server owns the process)
disable_created_metrics()

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class EngineCollector(Collector):
    """Engine stats, the model and cache configuration, and device memory, read when Prometheus scrapes."""

    def __init__(self, engine_stats: Callable[[], EngineStats | None], engine_info: Callable[[], ModelInfo | None]):
        self._engine_stats = engine_stats  # None while the model loads
        self._engine_info = engine_info  # likewise
        self._nvml = _nvml_handle()

    def collect(self) -> Iterable[Any]:
        s = self._engine_stats()
        g = lambda name, doc, v: GaugeMetricFamily(name, doc, value=float(v))
        c = lambda name, doc, v: CounterMetricFamily(name, doc, value=float(v))
        running = s.running if s else 0
        yield g("adsa_num_requests_running", "Images being decoded", running)
        yield g("adsa_num_requests_waiting", "Images waiting for admission", s.waiting if s else 0)
        cap = s.kv_capacity_tokens if s else 0
        used = s.kv_used_tokens if s else 0
        yield g("adsa_kv_cache_capacity_tokens", "KV pool capacity in token slots", cap)
        yield g("adsa_kv_cache_used_tokens", "KV token slots in use", used)
        yield g("adsa_kv_cache_usage_ratio", "Used / capacity of the KV pool", used / cap if cap else 0.0)
        yield c("adsa_kv_evictions", "KV slot evictions", s.evictions_total if s else 0)
        yield c(
            "adsa_kv_spilled_bytes",
            "K/V bytes spilled to pinned CPU memory",
            s.spilled_bytes_total if s else 0,
        )
        yield c(
            "adsa_kv_spill_dropped_steps",
            "Sequence steps whose evicted K/V was not spilled (the pinned spill arena was full)",
            s.spill_dropped_steps_total if s else 0,
        )
        yield c(
            "adsa_num_preemptions",
            "Images swapped out to CPU memory to make room for higher-priority work",
            s.swapped_out_total if s else 0,
        )
        yield c("adsa_images_generated", "Images finished", s.images_total if s else 0)
        yield c(
            "adsa_image_decode_chunks",
            "VQ decodes of finished images, each padded to the chunk size (images / chunks: the chunks' fill)",
            s.image_chunks_total if s else 0,
        )
        yield c(
            "adsa_engine_loop_busy_seconds",
            "Host seconds the engine loop spent inside steps (rate near 1: the loop never idles)",
            s.host_busy_s_total if s else 0,
        )
        yield c("adsa_engine_steps", "Decode steps run", s.steps_total if s else 0)
        yield c("adsa_tokens_generated", "Image tokens decoded", s.tokens_total if s else 0)
        requests = CounterMetricFamily("adsa_requests", "Engine requests (one per image) by outcome", labels=["status"])
        for status, n in sorted((s.requests_total_by_status if s else {}).items()):
            requests.add_metric([str(status)], float(n))
        yield requests
        if (info := self._engine_info()) is not None:
            yield from self._info(info)
        yield from self._memory()

    def _info(self, info: ModelInfo) -> Iterable[Any]:
        yield InfoMetricFamily(
            "adsa_model",
            "The served model",
            value={"model": info.name, "model_type": info.model_type, "image_size": str(info.image_size)},
        )
        yield InfoMetricFamily(
            "adsa_cache_config",
            "KV cache configuration: default policy and budget (tokens per sequence), K/V storage, pool size",
            value={
                "model": info.name,
                "policy": info.default_policy,
                "budget": str(info.default_budget),
                "kv_cache_dtype": info.kv_cache_dtype,
                "pool_bytes": str(info.kv_pool_bytes),
                "max_batch_size": str(info.max_batch_size),
            },
        )

    def _memory(self) -> Iterable[Any]:
        alloc = reserved = peak = 0
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                alloc, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
                peak = torch.cuda.max_memory_allocated()
        except Exception:  # a scrape must never fail because of a device query
            pass
        yield GaugeMetricFamily("adsa_gpu_memory_allocated_bytes", "torch allocated device memory", value=alloc)
        yield GaugeMetricFamily("adsa_gpu_memory_reserved_bytes", "torch reserved device memory", value=reserved)
        yield GaugeMetricFamily("adsa_gpu_memory_peak_bytes", "torch peak allocated device memory", value=peak)
        if self._nvml is not None:
            try:
                import pynvml

                info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml)
                yield GaugeMetricFamily(
                    "adsa_gpu_memory_used_bytes", "Device memory used (NVML, all processes)", value=info.used
                )
                yield GaugeMetricFamily("adsa_gpu_memory_total_bytes", "Device memory (NVML)", value=info.total)
            except Exception:
                pass


def _nvml_handle() -> Any | None:
    """NVML handle of the current CUDA device, when pynvml and CUDA are both there."""
    try:
        import pynvml
        import torch

        if not torch.cuda.is_available():
            return None
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:
        return None


class Metrics:
    """The app's registry and the histograms/counters the server itself feeds."""

    def __init__(self, engine_stats: Callable[[], EngineStats | None], engine_info: Callable[[], ModelInfo | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_*
            r.register(default)
        self.request_latency = Histogram(
            "adsa_request_latency_seconds",
            "Arrival to finished image (per image)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "adsa_queue_time_seconds",
            "Arrival to first decode step (per image)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_preview = Histogram(
            "adsa_time_to_first_preview_seconds",
            "Arrival to first partial preview (streamed images)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_step = Histogram(
            "adsa_decode_step_seconds",
            "One decode step (model + sampling) as the device runs it (CUDA events; host time on a CPU)",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.step_period = Counter(
            "adsa_engine_step_period_seconds",
            "Sum of the times between the ends of consecutive decode steps: with adsa_engine_device_busy_seconds, "
            "how much of the time the device waited for the host (busy/period near 1: device-bound)",
            registry=r,
        )
        self.device_busy = Counter(
            "adsa_engine_device_busy_seconds",
            "Sum of the decode steps' device time",
            registry=r,
        )
        self.warmup_seconds = Gauge(
            "adsa_engine_warmup_seconds", "Warm-up at start: graph captures and compiles", registry=r
        )
        self.start_seconds = Gauge(
            "adsa_engine_start_seconds", "Start of the engine process to ready (load + warm-up)", registry=r
        )
        self.batch_size = Histogram(
            "adsa_batch_size", "Rows (sequences) in one decode step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.http_requests = Counter(
            "adsa_http_requests",
            "HTTP requests by route template and status",
            ["route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "adsa_http_request_duration_seconds",
            "HTTP request duration (whole stream for SSE)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(EngineCollector(engine_stats, engine_info))

    def on_engine_step(self, t: StepTiming) -> None:
        """Engine step listener (the engine client's reader task)."""
        self.decode_step.observe(t.device_s)
        self.batch_size.observe(t.rows)
        if t.period_s > 0:  # 0: the first step after a pause
            self.step_period.inc(t.period_s)
            self.device_busy.inc(t.device_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope, routes: Iterable[BaseRoute] = ()) -> str:
    """The label for a request: the matched route's template ("/v1/models/{model_id}"), never the raw
    path, so unknown paths cannot create new series; "unmatched" when no route takes the path.

    The router leaves the route it picked in the scope for the API's own routes. Requests it never
    saw (refused by an outer middleware: 413) and FastAPI's built-in /docs, /redoc and /openapi.json
    (plain Starlette routes, which it may not record there) are matched again against `routes`: a
    full match first, then a method-only one, as the router does (a 405 counts under its route)."""
    path = getattr(scope.get("route"), "path", None)  # as declared: "/static/{path:path}"
    if path:
        return str(path)
    partial = None
    for r in routes:
        if not isinstance(r, Route):  # included routers, mounts: `routes` lists their routes too
            continue
        match, _ = r.matches(scope)
        if match is Match.FULL:
            return r.path
        if match is Match.PARTIAL and partial is None:
            partial = r.path
    return partial or "unmatched"


class HTTPMetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which breaks streaming disconnect detection).

    routes: every route of the app with its full template (see `route_template`)."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics], routes: Iterable[BaseRoute] = ()):
        self.app, self.metrics, self.routes = app, metrics, tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_template(scope, self.routes)
            m = self.metrics()
            m.http_requests.labels(route, str(status)).inc()
            m.http_duration.labels(route).observe(time.perf_counter() - start)
