"""The load generator: open-loop Poisson stages and closed-loop fixed-concurrency stages over httpx.

Every loop is bounded twice: each stage by a request count and a duration, and the whole run by
a hard wall-clock deadline (`max_duration_s`) after which in-flight requests are cancelled and
recorded as such. The server is reached only at the URL given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import promtext
from .schedule import poisson_arrivals
from .stats import percentile, summarize_stage
from .workload import Workload

# Gauges sampled from /metrics during the run (summed over label sets), for the KV-usage-over-time plot.
SAMPLED_GAUGES = (
    "adsa_kv_cache_usage_ratio",
    "adsa_kv_cache_capacity_tokens",
    "adsa_num_requests_waiting",
    "adsa_num_requests_running",
    "adsa_gpu_memory_allocated_bytes",
    "adsa_gpu_memory_reserved_bytes",
)
# Counters whose per-stage deltas go into summary.json.
STAGE_COUNTERS = (
    "adsa_images_generated_total",
    "adsa_tokens_generated_total",
    "adsa_kv_evictions_total",
    "adsa_kv_spilled_bytes_total",
)
# Server-side histograms whose per-stage quantiles (from bucket deltas) go into summary.json.
STAGE_HISTOGRAMS = (
    "adsa_queue_time_seconds",
    "adsa_request_latency_seconds",
    "adsa_time_to_first_preview_seconds",
    "adsa_decode_step_seconds",
    "adsa_batch_size",
)


CLIENT_SHARDS = 32  # httpx clients (connection pools) that the requests are spread over


@dataclass
class Stage:
    mode: str  # "poisson" (open loop, rate = requests/s) or "concurrency" (closed loop)
    value: float  # the rate or the number of concurrent clients
    fraction: float | None = None  # open loop planned as this fraction of the probe's throughput
    probe: bool = False  # the closed-loop probe that measures capacity before the relative stages

    @property
    def label(self) -> str:
        if self.probe:
            return f"probe concurrency={int(self.value)}"
        if self.fraction is not None:
            # named by the fraction, so two runs' stages line up in `compare` whatever their capacity
            return f"rate={self.fraction:g}xcap"
        return f"rate={self.value:g}" if self.mode == "poisson" else f"concurrency={int(self.value)}"


@dataclass
class RunConfig:
    url: str = "http://127.0.0.1:8000"
    out: Path = Path("out/loadtest")
    stages: list[Stage] = field(default_factory=list)
    requests_per_stage: int = 100  # bound 1 of a stage
    stage_duration_s: float = 60.0  # bound 2 of a stage (arrivals / new requests stop then)
    max_duration_s: float = 900.0  # hard stop for the whole run, in-flight requests included
    timeout_s: float = 300.0  # per request
    drain_timeout_s: float | None = None  # after a stage's arrivals; None: timeout_s
    pause_s: float = 0.0  # between stages, so queues empty
    slo_ms: float = 10_000.0
    stream: bool = False
    response_format: str = "b64_json"
    metrics: bool = True
    metrics_url: str | None = None  # default: URL + /metrics
    metrics_interval_s: float = 1.0
    max_inflight: int = 1024  # open loop: arrivals beyond this are recorded as client_overload
    seed: int = 0
    api_key: str | None = None
    workload: Workload = field(default_factory=Workload)
    progress: bool = True
    # capacity probe: a closed-loop stage of this many clients runs first; its steady throughput
    # (req/s) times each of relative_rates gives the open-loop stages that follow it
    probe_concurrency: int | None = None
    # closed loop: client i sends its first request i * ramp_s / concurrency after the stage starts,
    # so completions do not come in synchronized waves of one batch (equal-length images finish
    # together, and a closed loop keeps them together); the steady window starts after the ramp
    ramp_s: float = 0.0
    probe_duration_s: float | None = None  # None: stage_duration_s
    relative_rates: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["stages"] = [s.label for s in self.stages]
        d["api_key"] = "***" if self.api_key else None
        d["workload"] = self.workload.to_json()
        return d


@dataclass
class RequestRecord:
    """One request as the client saw it. Times in seconds from the run start (monotonic clock)."""

    stage: str
    index: int  # run-wide request number (its seed is workload.seed_base + index)
    scheduled_s: float | None = None  # open loop: when it was due
    sent_s: float | None = None
    headers_s: float | None = None  # response headers received
    first_byte_s: float | None = None  # first body byte
    first_preview_s: float | None = None  # first `partial_image` SSE event (stream only)
    end_s: float | None = None
    status: int | None = None  # HTTP status; None for a transport error or a cancelled request
    ok: bool = False
    error: str | None = None  # transport error kind, cancel reason, or the body's "type"
    error_message: str | None = None
    retry_after: str | None = None  # on 429
    images: int = 0
    bytes: int = 0
    # what the server reports per image (data[i].timings / kv_stats in the body or SSE `image` events):
    server_queue_s: float | None = None  # max over the request's images of timings.queue_s
    server_run_s: float | None = None  # max of timings.run_s
    kv_evictions: int | None = None  # sum of kv_stats.evictions
    kv_spilled_bytes: int | None = None  # sum of kv_stats.spilled_bytes
    peak_kv_tokens: int | None = None  # max of kv_stats.peak_kv_tokens
    events: dict[str, int] = field(default_factory=dict)  # SSE event counts
    payload: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_s"] = (self.end_s - self.sent_s) if self.end_s is not None and self.sent_s is not None else None
        d["ttfb_s"] = _minus(self.first_byte_s, self.sent_s)
        d["ttfp_s"] = _minus(self.first_preview_s, self.sent_s)
        d["schedule_lag_s"] = _minus(self.sent_s, self.scheduled_s)
        return d


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _read_error(rec: RequestRecord, body: Any, fallback: str) -> None:
    """The server's error body, OpenAI's shape `{"error": {"message", "code", ...}}`, into the record."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        raise ValueError(f"not an API error body: {str(body)[:200]}")
    rec.error = str(err.get("code") or fallback)
    rec.error_message = str(err.get("message", ""))[:500]


def _absorb_image(rec: RequestRecord, item: Any) -> None:
    """Fold one image's server-reported timings and KV stats into the record."""
    if not isinstance(item, dict):
        return
    t = item.get("timings") or {}
    kv = item.get("kv_stats") or {}
    for attr, value, combine in (
        ("server_queue_s", t.get("queue_s"), max),
        ("server_run_s", t.get("run_s"), max),
        ("kv_evictions", kv.get("evictions"), lambda a, b: a + b),
        ("kv_spilled_bytes", kv.get("spilled_bytes"), lambda a, b: a + b),
        ("peak_kv_tokens", kv.get("peak_kv_tokens"), max),
    ):
        if isinstance(value, (int, float)):
            old = getattr(rec, attr)
            setattr(rec, attr, value if old is None else combine(old, value))


def parse_server_timing(header: str | None) -> float | None:
    """`queue;dur=12.5, run;dur=800` -> 0.0125 (seconds) for the `queue` entry."""
    if not header:
        return None
    for entry in header.split(","):
        parts = [p.strip() for p in entry.split(";")]
        if parts[0] != "queue":
            continue
        for p in parts[1:]:
            if p.startswith("dur="):
                try:
                    return float(p[4:]) / 1000.0
                except ValueError:
                    return None
    return None


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < (0.5 if self.tty else 5.0):
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class RunResult:
    records: list[dict[str, Any]]
    stages: list[dict[str, Any]]
    timeseries: list[dict[str, Any]]
    metrics_before: str | None
    metrics_after: str | None
    models: dict[str, Any] | None
    started_unix: float
    elapsed_s: float
    hard_stopped: bool
    notes: list[str]
    probe: dict[str, Any] | None = None  # the capacity probe's result, when the run had one


class LoadRunner:
    def __init__(self, cfg: RunConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.t0 = 0.0
        self.deadline = math.inf
        self.rng = random.Random(cfg.seed)
        self.records: list[RequestRecord] = []
        self.timeseries: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.inflight = 0
        self.current_stage = ""
        self.progress = _Progress(cfg.progress)
        self.hard_stopped = False
        self._next_index = 0
        self._stage_records: list[RequestRecord] = []
        self.tokens_per_image: int | None = None
        self.probe: dict[str, Any] | None = None
        self._clients: list[httpx.AsyncClient] = []
        headers = {"User-Agent": "adsa-loadtest"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._headers = headers

    # ---- time ----------------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock() - self.t0

    def remaining(self) -> float:
        return self.deadline - self.clock()

    # ---- metrics -------------------------------------------------------------------------------
    @property
    def metrics_url(self) -> str:
        return self.cfg.metrics_url or self.cfg.url.rstrip("/") + "/metrics"

    async def scrape(self, client: httpx.AsyncClient) -> str | None:
        if not self.cfg.metrics:
            return None
        try:
            r = await client.get(self.metrics_url, timeout=max(0.1, min(10.0, self.remaining())))
        except httpx.HTTPError as e:
            self._note(f"/metrics scrape failed: {type(e).__name__}: {e}")
            return None
        if r.status_code != 200:
            self._note(f"/metrics answered {r.status_code}")
            return None
        return r.text

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    async def _sampler(self, client: httpx.AsyncClient) -> None:
        while True:
            text = await self.scrape(client)
            if text is not None:
                try:
                    exp = promtext.parse(text)
                except promtext.ParseError as e:
                    self._note(f"/metrics did not parse: {e}")
                else:
                    row: dict[str, Any] = {"t_s": self.now(), "stage": self.current_stage}
                    for name in SAMPLED_GAUGES:
                        row[name] = exp.sum(name)
                    self.timeseries.append(row)
            await asyncio.sleep(self.cfg.metrics_interval_s)

    async def _progress_loop(self) -> None:
        while True:
            self._print_progress()
            await asyncio.sleep(0.25)

    def _print_progress(self, force: bool = False) -> None:
        recs = self._stage_records
        done = [r for r in recs if r.end_s is not None or r.error]
        ok = [r for r in done if r.ok]
        lat = [r.end_s - r.sent_s for r in ok if r.end_s is not None and r.sent_s is not None]
        p50 = percentile(lat, 50)
        n429 = sum(1 for r in done if r.status == 429)
        err = len(done) - len(ok) - n429
        text = (
            f"[{self.current_stage}] sent {sum(1 for r in recs if r.sent_s is not None)}"
            f"/{self.cfg.requests_per_stage} done {len(done)} ok {len(ok)} 429 {n429} err {err}"
            f" inflight {self.inflight} p50 {'-' if p50 is None else f'{p50:.2f}s'}"
            f" elapsed {self.now():.1f}s"
        )
        self.progress.update(text, force=force)

    def _shard(self, i: int) -> httpx.AsyncClient:
        return self._clients[i % len(self._clients)]

    # ---- one request ---------------------------------------------------------------------------
    def _new_record(self, scheduled_s: float | None) -> RequestRecord:
        index = self._next_index
        self._next_index += 1
        payload = self.cfg.workload.payload(index, self.rng)
        payload["response_format"] = self.cfg.response_format
        if self.cfg.stream:
            payload["stream"] = True
        rec = RequestRecord(stage=self.current_stage, index=index, scheduled_s=scheduled_s, payload=payload)
        self.records.append(rec)
        self._stage_records.append(rec)
        return rec

    async def _request(self, client: httpx.AsyncClient, rec: RequestRecord) -> None:
        budget = min(self.cfg.timeout_s, self.remaining())
        if budget <= 0:
            rec.error = "hard_stop"
            return
        timeout = httpx.Timeout(budget, connect=min(10.0, budget))
        self.inflight += 1
        rec.sent_s = self.now()
        try:
            async with client.stream(
                "POST", self.cfg.url.rstrip("/") + "/v1/generate", json=rec.payload, timeout=timeout
            ) as resp:
                rec.headers_s = self.now()
                rec.status = resp.status_code
                # a Server-Timing `queue;dur=` header, if a proxy or server sends one; the body wins
                rec.server_queue_s = parse_server_timing(resp.headers.get("server-timing"))
                ctype = resp.headers.get("content-type", "")
                if resp.status_code == 200 and "text/event-stream" in ctype:
                    await self._read_sse(resp, rec)
                else:
                    chunks: list[bytes] = []  # joined once: += on bytes copies the body per chunk
                    async for chunk in resp.aiter_bytes():
                        if rec.first_byte_s is None and chunk:
                            rec.first_byte_s = self.now()
                        chunks.append(chunk)
                    body = b"".join(chunks)
                    rec.bytes = len(body)
                    self._finish_body(resp, rec, body)
                rec.end_s = self.now()
        except asyncio.CancelledError:
            rec.error = rec.error or "cancelled"
            rec.ok = False
            raise
        except httpx.TimeoutException as e:
            rec.error, rec.error_message, rec.ok = "timeout", str(e) or type(e).__name__, False
        except httpx.HTTPError as e:
            rec.error, rec.error_message, rec.ok = type(e).__name__, str(e), False
        finally:
            self.inflight -= 1

    def _finish_body(self, resp: httpx.Response, rec: RequestRecord, body: bytes) -> None:
        ctype = resp.headers.get("content-type", "")
        if resp.status_code != 200:
            rec.ok = False
            rec.retry_after = resp.headers.get("retry-after")
            try:
                _read_error(rec, json.loads(body), str(resp.status_code))
            except ValueError:
                rec.error = str(resp.status_code)
                rec.error_message = body[:200].decode("utf-8", "replace")
            return
        if ctype.startswith("image/"):
            rec.ok, rec.images = True, 1
            return
        try:
            data = json.loads(body)
            items = data.get("data") or []
            rec.images = len(items)
            for item in items:
                _absorb_image(rec, item)
            rec.ok = rec.images > 0
            if not rec.ok:
                rec.error = "no_images"
        except (ValueError, AttributeError):
            rec.ok, rec.error = False, "bad_body"

    async def _read_sse(self, resp: httpx.Response, rec: RequestRecord) -> None:
        event = "message"
        data_lines: list[str] = []
        saw_done = False
        async for line in resp.aiter_lines():
            if rec.first_byte_s is None:
                rec.first_byte_s = self.now()
            rec.bytes += len(line) + 1
            if line == "":
                if data_lines or event != "message":
                    saw_done |= self._on_event(rec, event, "\n".join(data_lines))
                event, data_lines = "message", []
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                event = value
            elif key == "data":
                data_lines.append(value)
        if data_lines:
            saw_done |= self._on_event(rec, event, "\n".join(data_lines))
        if rec.error is None:
            rec.ok = rec.images > 0
            if not rec.ok:
                rec.error = "stream_ended_without_image" if not saw_done else "no_images"

    def _on_event(self, rec: RequestRecord, event: str, data: str) -> bool:
        rec.events[event] = rec.events.get(event, 0) + 1
        if event == "partial_image" and rec.first_preview_s is None:
            rec.first_preview_s = self.now()
        elif event == "image":
            rec.images += 1
            with contextlib.suppress(ValueError):
                _absorb_image(rec, json.loads(data))
        elif event == "error":
            try:
                _read_error(rec, json.loads(data), "stream_error")
            except ValueError:
                rec.error, rec.error_message = "stream_error", data[:200]
        return event == "done"

    # ---- stages --------------------------------------------------------------------------------
    async def _poisson_stage(self, client: httpx.AsyncClient, rate: float) -> tuple[float, float, bool]:
        cfg = self.cfg
        offsets = poisson_arrivals(rate, cfg.requests_per_stage, cfg.stage_duration_s, self.rng)
        start_clock = self.clock()
        stage_start = self.now()
        tasks: list[asyncio.Task] = []
        last_send = 0.0
        for off in offsets:
            due = start_clock + off
            if due >= self.deadline:
                self.hard_stopped = True
                break
            delay = due - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = self._new_record(scheduled_s=stage_start + off)
            last_send = off
            if self.inflight >= cfg.max_inflight:
                rec.error = "client_overload"
                continue
            tasks.append(asyncio.create_task(self._request(self._shard(rec.index), rec)))
        # count-bounded: the arrivals ended with the last one; time-bounded: with the stage duration
        truncated_by_time = len(offsets) < cfg.requests_per_stage
        count_bounded = not truncated_by_time or self.hard_stopped
        window = last_send if count_bounded else cfg.stage_duration_s
        drain = cfg.timeout_s if cfg.drain_timeout_s is None else cfg.drain_timeout_s
        await self._wait_all(tasks, drain)
        return stage_start, max(window, 1e-9), count_bounded

    async def _concurrency_stage(
        self, client: httpx.AsyncClient, concurrency: int, duration_s: float | None = None
    ) -> tuple[float, float]:
        cfg = self.cfg
        stage_start = self.now()
        stop_at = min(self.clock() + (duration_s or cfg.stage_duration_s), self.deadline)

        async def worker(i: int) -> None:
            if cfg.ramp_s > 0:
                await asyncio.sleep(min(i * cfg.ramp_s / concurrency, max(0.0, stop_at - self.clock())))
            while len(self._stage_records) < cfg.requests_per_stage and self.clock() < stop_at:
                rec = self._new_record(scheduled_s=None)
                await self._request(self._shard(i), rec)

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        await self._wait_all(tasks, cfg.timeout_s + cfg.stage_duration_s)
        ends = [r.sent_s for r in self._stage_records if r.sent_s is not None]
        window = (max(ends) - stage_start) if ends else cfg.stage_duration_s
        return stage_start, max(window, 1e-9)

    async def _wait_all(self, tasks: list[asyncio.Task], drain_s: float) -> None:
        if not tasks:
            return
        limit = max(0.0, min(drain_s, self.remaining()))
        _, pending = await asyncio.wait(tasks, timeout=limit)
        if pending:
            if self.remaining() <= 0:
                self.hard_stopped = True
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            reason = "hard_stop" if self.hard_stopped else "drain_timeout"
            for r in self._stage_records:
                if r.error == "cancelled":
                    r.error = reason

    # ---- whole run -----------------------------------------------------------------------------
    async def run(self) -> RunResult:
        cfg = self.cfg
        self.t0 = self.clock()
        self.deadline = self.t0 + cfg.max_duration_s
        started_unix = time.time()
        limits = httpx.Limits(max_connections=cfg.max_inflight + 4, max_keepalive_connections=64)
        stage_summaries: list[dict[str, Any]] = []
        models = None
        async with contextlib.AsyncExitStack() as stack:
            # generate requests go through CLIENT_SHARDS clients (worker i / request i: shard i mod n):
            # httpcore scans its whole pool on every request, which costs ~7 ms of client CPU per
            # request at 256 connections in one pool, enough to make the load tester the bottleneck
            tls = ssl.create_default_context()  # one for all shards (each would load the CA bundle)
            self._clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(headers=self._headers, limits=limits, trust_env=False, verify=tls)
                )
                for _ in range(CLIENT_SHARDS)
            ]
            client = self._clients[0]  # also /v1/models and the /metrics scrapes
            models = await self._models(client)
            metrics_before = await self.scrape(client)
            background = [asyncio.create_task(self._progress_loop())]
            if cfg.metrics:
                background.append(asyncio.create_task(self._sampler(client)))
            try:
                stages = list(cfg.stages)
                if cfg.probe_concurrency:
                    stages = [Stage("concurrency", float(cfg.probe_concurrency), probe=True), *stages]
                i = 0
                while i < len(stages):
                    stage = stages[i]
                    if self.remaining() <= 0:
                        self.hard_stopped = True
                        self._note(f"hard stop after {cfg.max_duration_s:g}s: stages from {stage.label} skipped")
                        break
                    if i and cfg.pause_s > 0:
                        await asyncio.sleep(min(cfg.pause_s, max(0.0, self.remaining())))
                    summary = await self._run_stage(client, stage)
                    stage_summaries.append(summary)
                    if stage.probe:
                        stages[i + 1 : i + 1] = self._plan_relative(summary)
                    i += 1
            finally:
                for t in background:
                    t.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                self.progress.done()
            # the last scrape gets a little time of its own even after a hard stop
            self.deadline = max(self.deadline, self.clock() + 2.0)
            metrics_after = await self.scrape(client)
        return RunResult(
            records=[r.to_json() for r in self.records],
            stages=stage_summaries,
            timeseries=self.timeseries,
            metrics_before=metrics_before,
            metrics_after=metrics_after,
            models=models,
            started_unix=started_unix,
            elapsed_s=self.now(),
            hard_stopped=self.hard_stopped,
            notes=self.notes,
            probe=self.probe,
        )

    def _plan_relative(self, probe_summary: dict[str, Any]) -> list[Stage]:
        """The open-loop stages at fractions of what the probe sustained (none if it sustained nothing)."""
        rps = probe_summary.get("steady_rps") or 0.0
        self.probe = {
            "concurrency": probe_summary.get("concurrency"),
            "steady_rps": rps,
            "steady_images_per_s": probe_summary.get("steady_images_per_s"),
            "latency_p50_s": probe_summary.get("latency_p50_s"),
            "latency_p99_s": probe_summary.get("latency_p99_s"),
            "ok": probe_summary.get("ok"),
            "relative_rates": list(self.cfg.relative_rates),
        }
        if rps <= 0:
            if self.cfg.relative_rates:
                self._note("the capacity probe completed no request: its relative stages were skipped")
            return []
        return [Stage("poisson", f * rps, fraction=f) for f in self.cfg.relative_rates]

    async def _models(self, client: httpx.AsyncClient) -> dict[str, Any] | None:
        try:
            r = await client.get(self.cfg.url.rstrip("/") + "/v1/models", timeout=min(10.0, self.remaining()))
            if r.status_code == 200:
                data = r.json()
                first = (data.get("data") or [{}])[0]
                size = first.get("image_size")
                if isinstance(size, int) and size > 0:
                    self.tokens_per_image = (size // 16) ** 2
                return data
            self._note(f"/v1/models answered {r.status_code}")
        except (httpx.HTTPError, ValueError) as e:
            self._note(f"/v1/models failed: {type(e).__name__}: {e}")
        return None

    async def _run_stage(self, client: httpx.AsyncClient, stage: Stage) -> dict[str, Any]:
        cfg = self.cfg
        self.current_stage = stage.label
        self._stage_records = []
        before_text = await self.scrape(client)
        count_bounded = False
        if stage.mode == "poisson":
            stage_start, window, count_bounded = await self._poisson_stage(client, stage.value)
        else:
            duration = cfg.probe_duration_s if stage.probe else None
            stage_start, window = await self._concurrency_stage(client, int(stage.value), duration)
        after_text = await self.scrape(client)
        self._print_progress(force=True)
        recs = [r.to_json() for r in self._stage_records]
        summary = summarize_stage(
            recs,
            mode=stage.mode,
            stage_start_s=stage_start,
            arrival_window_s=window,
            slo_s=cfg.slo_ms / 1000.0,
            offered_rps=stage.value if stage.mode == "poisson" else None,
            concurrency=int(stage.value) if stage.mode == "concurrency" else None,
            label=stage.label,
            count_bounded=count_bounded,
            ramp_s=cfg.ramp_s if stage.mode == "concurrency" else 0.0,
        )
        summary["offered_images_per_s"] = (
            stage.value * cfg.workload.mean_images_per_request() if stage.mode == "poisson" else None
        )
        summary["fraction"] = stage.fraction
        summary["probe"] = stage.probe
        if self.tokens_per_image:
            summary["achieved_tokens_per_s_est"] = summary["achieved_images_per_s"] * self.tokens_per_image
        summary["server"] = server_stage_delta(before_text, after_text, summary["elapsed_s"])
        return summary


def server_stage_delta(before: str | None, after: str | None, elapsed_s: float) -> dict[str, Any] | None:
    """Counter deltas and histogram quantiles between two scrapes (None when either is missing)."""
    if before is None or after is None:
        return None
    try:
        b, a = promtext.parse(before), promtext.parse(after)
    except promtext.ParseError as e:
        return {"error": str(e)}
    deltas = promtext.counter_deltas(b, a)
    out: dict[str, Any] = {}
    for name in STAGE_COUNTERS:
        v = promtext.delta_sum(deltas, name)
        out[name] = v
        if v is not None and elapsed_s > 0:
            out[name.removesuffix("_total") + "_per_s"] = v / elapsed_s
    by_status: dict[str, float] = {}
    for (name, labels), v in deltas.items():
        if name == "adsa_requests_total" and v:
            status = dict(labels).get("status", "")
            by_status[status] = by_status.get(status, 0.0) + v
    out["adsa_requests_total_by_status"] = by_status
    for fam in STAGE_HISTOGRAMS:
        buckets = promtext.histogram_buckets(deltas, fam)
        count = promtext.delta_sum(deltas, fam + "_count")
        total = promtext.delta_sum(deltas, fam + "_sum")
        out[fam] = {
            "count": count,
            "mean": (total / count) if count and total is not None else None,
            "p50": promtext.histogram_quantile(0.5, buckets),
            "p90": promtext.histogram_quantile(0.9, buckets),
            "p99": promtext.histogram_quantile(0.99, buckets),
        }
    return out


def run_sync(cfg: RunConfig) -> RunResult:
    return asyncio.run(LoadRunner(cfg).run())
