"""Fixtures for the load tester's tests, and a FAKE adsa-serve (stdlib HTTP on 127.0.0.1, sleeps, no model).

It is not the real server and proves nothing about it; it only speaks enough of the HTTP contract
(POST /v1/generate with JSON or SSE, GET /v1/models, /healthz, /metrics with the contract's
metric names) for the load tester to be exercised end to end: `slots` requests run at once, each
sleeping `service_s` per image; more than `max_queue` waiting are rejected with 429 + Retry-After.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.sum += v
        for i, b in enumerate(BUCKETS):
            if v <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        cum = 0
        for b, c in zip(BUCKETS, self.counts, strict=False):
            cum += c
            out.append(f'{name}_bucket{{le="{b}"}} {cum}')
        cum += self.counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {cum}', f"{name}_sum {self.sum}", f"{name}_count {cum}"]
        return out


class FakeState:
    def __init__(self, slots: int, service_s: float, max_queue: int, num_classes: int, image_size: int):
        self.slots = threading.Semaphore(slots)
        self.n_slots = slots
        self.service_s = service_s
        self.max_queue = max_queue
        self.num_classes = num_classes
        self.image_size = image_size
        self.lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.requests: dict[str, int] = {}
        self.images = 0
        self.evictions = 0
        self.queue_hist = _Histogram()
        self.latency_hist = _Histogram()
        self.generate_calls = 0

    def count(self, status: str) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def metrics(self) -> str:
        with self.lock:
            tokens = self.images * (self.image_size // 16) ** 2
            lines = [
                "# HELP adsa_requests_total Requests by final status (FAKE server).",
                "# TYPE adsa_requests_total counter",
            ]
            lines += [f'adsa_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            lines += [
                "# TYPE adsa_images_generated_total counter",
                f"adsa_images_generated_total {self.images}",
                "# TYPE adsa_tokens_generated_total counter",
                f"adsa_tokens_generated_total {tokens}",
                "# TYPE adsa_kv_evictions_total counter",
                f"adsa_kv_evictions_total {self.evictions}",
                "# TYPE adsa_kv_spilled_bytes_total counter",
                f"adsa_kv_spilled_bytes_total {self.evictions * 4096}",
                "# TYPE adsa_num_requests_running gauge",
                f"adsa_num_requests_running {self.running}",
                "# TYPE adsa_num_requests_waiting gauge",
                f"adsa_num_requests_waiting {self.waiting}",
                "# TYPE adsa_kv_cache_usage_ratio gauge",
                f"adsa_kv_cache_usage_ratio {self.running / self.n_slots}",
                "# TYPE adsa_kv_cache_capacity_tokens gauge",
                f"adsa_kv_cache_capacity_tokens {self.n_slots * 256}",
            ]
            lines += self.queue_hist.lines("adsa_queue_time_seconds")
            lines += self.latency_hist.lines("adsa_request_latency_seconds")
        return "\n".join(lines) + "\n"


def _image(req: dict, i: int, queue_s: float, run_s: float) -> dict:
    """One entry of the response's `data` (the real server's shape: timings and kv_stats per image)."""
    return {
        "index": i,
        "seed": int(req.get("seed", 0)) + i,
        "b64_json": base64.b64encode(PNG_1PX).decode(),
        "kv_stats": {
            "kv_budget_tokens": 16,
            "peak_kv_tokens": 16,
            "evictions": 3,
            "spilled_bytes": 3 * 4096,
            "swapped_out": 0,
        },
        "timings": {"queue_s": queue_s, "run_s": run_s},
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeState  # set on the subclass made per server

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, msg: str, headers=None) -> None:
        body = {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": code}}
        self._send(status, json.dumps(body).encode(), headers=headers)

    def do_GET(self) -> None:
        st = self.state
        if self.path == "/healthz":
            self._send(200, b'{"status":"ok"}')
        elif self.path == "/metrics":
            self._send(200, st.metrics().encode(), "text/plain; version=0.0.4")
        elif self.path == "/v1/models":
            classes = [{"id": i, "name": f"class{i}", "emoji": ""} for i in range(st.num_classes)]
            body = {
                "object": "list",
                "data": [
                    {
                        "id": "fake-demo",
                        "image_size": st.image_size,
                        "num_classes": st.num_classes,
                        "classes": classes,
                        "policies": ["dense", "adsa", "window"],
                    }
                ],
            }
            self._send(200, json.dumps(body).encode())
        else:
            self._error(404, "not_found", self.path)

    def do_POST(self) -> None:
        st = self.state
        if self.path not in ("/v1/generate", "/generate"):
            self._error(404, "not_found", self.path)
            return
        arrived = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        try:
            req = json.loads(self.rfile.read(length))
        except ValueError:
            self._error(422, "invalid_request", "body is not JSON")
            return
        with st.lock:
            st.generate_calls += 1
        label = req.get("class_label")
        if label is not None and not 0 <= int(label) < st.num_classes:
            st.count("invalid")
            self._error(422, "invalid_request", f"class_label {label} out of range")
            return
        n = int(req.get("n", 1))
        with st.lock:
            if st.waiting >= st.max_queue:
                reject = True
            else:
                reject = False
                st.waiting += 1
        if reject:
            st.count("rejected")
            self._error(429, "queue_full", "queue full", headers={"Retry-After": "1"})
            return
        st.slots.acquire()
        try:
            with st.lock:
                st.waiting -= 1
                st.running += 1
            queue_s = time.monotonic() - arrived
            st.queue_hist.observe(queue_s)
            if req.get("stream"):
                self._stream(req, n, queue_s)
            else:
                time.sleep(st.service_s * n)
                data = [_image(req, i, queue_s, st.service_s) for i in range(n)]
                self._send(
                    200,
                    json.dumps({"created": int(time.time()), "seed": req.get("seed", 0), "data": data}).encode(),
                )
            with st.lock:
                st.images += n
                st.evictions += 3 * n
            st.count("ok")
            st.latency_hist.observe(time.monotonic() - arrived)
        finally:
            with st.lock:
                st.running -= 1
            st.slots.release()

    def _stream(self, req: dict, n: int, queue_s: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(name: str, data: dict) -> None:
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        b64 = base64.b64encode(PNG_1PX).decode()
        for i in range(n):
            event("progress", {"index": i, "tokens_done": 0, "tokens_total": 16})
            time.sleep(self.state.service_s / 2)
            event("partial_image", {"index": i, "rows_done": 2, "b64_json": b64})
            time.sleep(self.state.service_s / 2)
            event("image", _image(req, i, queue_s, self.state.service_s))
        event("done", {"n": n})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: Poisson bursts must not be refused

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the load tester cancelled the request (hard stop): expected
        super().handle_error(request, client_address)


class FakeServer:
    """Context manager: a FakeServer on 127.0.0.1 (random free port) served from a thread."""

    def __init__(
        self,
        slots: int = 2,
        service_s: float = 0.05,
        max_queue: int = 4,
        num_classes: int = 4,
        image_size: int = 64,
    ):
        self.state = FakeState(slots, service_s, max_queue, num_classes, image_size)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = _HTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_server():
    """A FAKE adsa-serve on 127.0.0.1 (2 slots, 50 ms per image, 429 beyond 4 waiting)."""
    with FakeServer(slots=2, service_s=0.05, max_queue=4) as srv:
        yield srv


@pytest.fixture
def make_fake_server():
    """The FakeServer class, for tests that need other speeds or limits (use it as a context manager)."""
    return FakeServer
