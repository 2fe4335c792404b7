"""The real daemon over real HTTP (uvicorn subprocess, real engine-core process, tiny model on the CPU)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_live import API_KEY, CPU_ENV, REPO, LiveServer, free_port

AUTH = {"Authorization": f"Bearer {API_KEY}"}

# every metric name DESIGN.md section 7 promises (sample names as exposed)
DESIGN_METRICS = [
    "adsa_requests_total",
    "adsa_images_generated_total",
    "adsa_tokens_generated_total",
    "adsa_num_requests_running",
    "adsa_num_requests_waiting",
    "adsa_kv_cache_usage_ratio",
    "adsa_kv_cache_capacity_tokens",
    "adsa_kv_evictions_total",
    "adsa_kv_spilled_bytes_total",
    "adsa_gpu_memory_allocated_bytes",
    "adsa_gpu_memory_reserved_bytes",
    "adsa_gpu_memory_peak_bytes",
    "adsa_request_latency_seconds",
    "adsa_queue_time_seconds",
    "adsa_time_to_first_preview_seconds",
    "adsa_decode_step_seconds",
    "adsa_batch_size",
    "adsa_http_requests_total",
    "adsa_http_request_duration_seconds",
]


def wait_for(cond, timeout: float = 30.0, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


def gauge(server: LiveServer, name: str, **labels) -> float:
    return server.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def idle(server: LiveServer) -> bool:
    m = server.metrics()
    return all(
        m.get((k, ()), 0) == 0
        for k in ("adsa_num_requests_running", "adsa_num_requests_waiting", "adsa_kv_cache_used_tokens")
    )


def test_probes_models_docs(live_server):
    with live_server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}
        card = c.get("/v1/models", headers=AUTH).json()["data"][0]
        assert card["model_type"] == "c2i" and card["num_classes"] == 1000 and card["image_size"] == 32
        assert card["classes"][207]["name"] == "golden retriever"  # a 1,000-class model gets ImageNet's names
        assert card["default_policy"] == "line" and card["seq_len"] == 64
        # the smallest budget a sparse policy runs with (8 x 8 tokens: one row + 1 of local window, the condition
        # token, one slot more); one token less is refused with the reason
        assert card["min_budget"] == 11
        ok = c.post("/v1/generate", json={"class_label": 1, "policy": "adsa", "kv_budget": 11}, headers=AUTH)
        assert ok.status_code == 200, ok.text
        refused = c.post("/v1/generate", json={"class_label": 1, "policy": "adsa", "kv_budget": 10}, headers=AUTH)
        assert refused.status_code == 422 and "must be larger than prefix" in refused.text
        assert c.get("/docs").status_code == 200
        assert "/v1/generate" in c.get("/openapi.json").json()["paths"]


def test_head_sends_headers_only(live_server):
    """HEAD /healthz, /readyz and /: GET's status line and Content-Length, and no body bytes on the wire (a client
    cannot see those through an HTTP library, which reads no body for HEAD)."""
    host, port = live_server.url.removeprefix("http://").rsplit(":", 1)
    for path in ("/healthz", "/readyz", "/"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and rest == b"", (path, raw[:500])
        length = re.search(rb"(?i)\r\ncontent-length: (\d+)\r\n", head + b"\r\n")
        with live_server.client() as c:
            assert length and int(length[1]) == len(c.get(path).content) > 0, (path, head)


def test_api_keys(live_server):
    with live_server.client() as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
            r = c.post("/v1/generate", json={"class_label": 1}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert c.get("/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200
        assert c.get("/metrics").status_code == 200  # scrapes need no key


def test_same_seed_same_bytes_and_png(live_server):
    with live_server.client(headers=AUTH) as c:
        a = c.post("/v1/generate", json={"class_label": 4, "n": 2, "seed": 1234})
        b = c.post("/v1/generate", json={"class_label": 4, "n": 2, "seed": 1234})
        assert a.status_code == b.status_code == 200 and a.headers["x-seed"] == "1234"
        ia, ib = a.json()["data"], b.json()["data"]
        assert [d["b64_json"] for d in ia] == [d["b64_json"] for d in ib]
        assert ia[0]["b64_json"] != ia[1]["b64_json"]
        # image i of a request is image 0 of a request with seed + i (independent of batch neighbours)
        one = c.post("/v1/generate", json={"class_label": 4, "seed": 1235}, headers={"Accept": "image/png"})
        assert one.headers["content-type"] == "image/png"
        assert base64.b64decode(ia[1]["b64_json"]) == one.content
        assert ia[0]["kv_stats"]["kv_budget_tokens"] == 32 and ia[0]["kv_stats"]["evictions"] > 0
        dense = c.post("/v1/generate", json={"class_label": 4, "seed": 9, "policy": "dense"}).json()
        assert dense["data"][0]["kv_stats"]["evictions"] == 0
        assert dense["data"][0]["kv_stats"]["kv_policy"] == "dense"  # what ran: asked for, or else the default
        assert c.post("/v1/generate", json={"class_label": 4}).json()["data"][0]["kv_stats"]["kv_policy"] == "line"
        # half the budget reserves less of the pool than dense
        assert 0 < ia[0]["kv_stats"]["kv_bytes"] < dense["data"][0]["kv_stats"]["kv_bytes"]


def test_concurrent_requests_share_decode_steps(live_server):
    def big_steps() -> float:  # decode steps that ran more than 2 rows (cfg off: one row per image)
        m = live_server.metrics()
        return m[("adsa_batch_size_count", ())] - m[("adsa_batch_size_bucket", (("le", "2.0"),))]

    before = big_steps()
    with live_server.client(headers=AUTH) as c, ThreadPoolExecutor(6) as pool:
        body = {"class_label": 2, "cfg_scale": 1.0}
        results = list(pool.map(lambda s: c.post("/v1/generate", json={**body, "seed": s}), range(6)))
    assert all(r.status_code == 200 for r in results)
    assert big_steps() > before


def test_stream_with_partial_previews(live_server):
    with live_server.client(headers=AUTH) as c:
        r = c.post("/v1/generate", json={"class_label": 5, "seed": 3, "stream": True, "preview_every_rows": 2})
    assert r.status_code == 200 and r.headers["x-seed"] == "3"
    events = [
        (b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:]))
        for b in r.text.strip().split("\n\n")
        if b.startswith("event:")
    ]
    kinds = [k for k, _ in events]
    assert kinds.count("partial_image") >= 1 and kinds.count("image") == 1 and kinds[-1] == "done"
    assert kinds.index("partial_image") < kinds.index("image")
    preview = next(d for k, d in events if k == "partial_image")
    assert base64.b64decode(preview["b64_json"]).startswith(b"\x89PNG") and preview["rows_done"] == 2
    assert any(k == "progress" and d["total"] == 64 for k, d in events)
    image, done = next(d for k, d in events if k == "image"), events[-1][1]["stats"]
    assert done["kv_budget_tokens"] == image["kv_stats"]["kv_budget_tokens"] == 32
    assert done["kv_bytes"] == image["kv_stats"]["kv_bytes"] > 0


def test_disconnect_cancels_and_frees_kv(live_server):
    def cancelled() -> float:
        return gauge(live_server, "adsa_requests_total", status="cancelled")

    wait_for(lambda: idle(live_server))
    before = cancelled()
    # plain JSON requests: raw sockets we can hang up on mid-generation. Three of 16 images (three batches,
    # over a second of work): one alone can finish (~0.5 s) before the server's disconnect poll sees the hang-up
    body = json.dumps({"class_label": 1, "n": 16}).encode()
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            s = stack.enter_context(socket.create_connection(("127.0.0.1", live_server.port)))
            s.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        wait_for(lambda: gauge(live_server, "adsa_num_requests_running") > 0)
    wait_for(lambda: idle(live_server))
    assert cancelled() > before
    # streamed request: the client closes the stream after the first event
    before = cancelled()
    body = {"class_label": 1, "n": 16, "stream": True}
    with live_server.client(headers=AUTH) as c, c.stream("POST", "/v1/generate", json=body) as r:
        next(r.iter_lines())
    wait_for(lambda: idle(live_server))
    assert cancelled() > before
    assert gauge(live_server, "adsa_kv_cache_usage_ratio") == 0


def test_deadline_is_504(live_server):
    with live_server.client(headers=AUTH) as c:
        r = c.post("/v1/generate", json={"class_label": 1, "n": 16, "timeout_s": 0.02})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    wait_for(lambda: idle(live_server))


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "a cat"}, "prompt"),  # text prompt on a class model
        ({"class_label": 1000}, "class_label"),  # out of range for this model: the engine core refuses
        ({"class_labels": [1, 1000]}, "class_labels"),
        ({"class_label": 1, "kv_budget": 3}, "kv_budget"),  # smaller than prefix + local window: the core refuses
        ({"class_label": 1, "n": 17}, "n"),
        ({"class_label": "1"}, "class_label"),
        ({"class_label": 1, "policy": "nope"}, "policy"),
    ],
)
def test_invalid_inputs_are_422(live_server, body, param):
    """A 422 whose `param` names the field at fault, wherever the check is (schema, service or engine core)."""
    with live_server.client(headers=AUTH) as c:
        r = c.post("/v1/generate", json=body)
    error = r.json()["error"]
    assert r.status_code == 422 and (error["code"], error["param"]) == ("invalid_request", param), r.text


def test_malformed_unknown_oversized(live_server):
    with live_server.client(headers=AUTH) as c:
        r = c.post("/v1/generate", content=b"{nope", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
        assert c.get("/v1/nothing").json() == {
            "error": {"message": "Not Found", "type": "not_found_error", "param": None, "code": "not_found"}
        }
        r = c.post("/v1/generate", content=b"[" + b"1," * 600_000 + b"1]", headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_start_up_ends_in_one_ready_line(live_server):
    """The line a person starting the server waits for: model, device, time to ready and a URL that works."""
    log = Path(live_server.log_path).read_text(errors="replace").splitlines()
    # this server logs JSON lines (ADSA_LOG_FORMAT=json); a person's terminal gets the same message as text
    messages = [json.loads(line)["message"] for line in log if line.startswith("{") and '"ready: ' in line]
    assert len(messages) == 1, messages
    m = re.fullmatch(r"ready: (\S+) on cpu in (\d+\.\d) s \u2014 (http://\S+)", messages[0])
    assert m, messages[0]
    assert 0 < float(m[2]) < 150 and m[3] == live_server.url
    with httpx.Client(base_url=m[3], headers=AUTH) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == m[1]


def test_curl_style_post_is_counted_under_its_route(live_server):
    """`curl -d '{...}'` (a form Content-Type, rewritten to JSON by the body middleware) is served and
    counted under /v1/generate, not "unmatched"."""
    key = ("adsa_http_requests_total", (("route", "/v1/generate"), ("status", "200")))
    before = live_server.metrics().get(key, 0.0)
    with live_server.client(headers=AUTH) as c:
        r = c.post(
            "/v1/generate",
            content=b'{"class_label": 2, "seed": 5}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert r.status_code == 200 and r.json()["data"][0]["seed"] == 5
    assert live_server.metrics()[key] == before + 1


def test_metrics_has_every_design_name(live_server):
    text = httpx.get(live_server.url + "/metrics").text
    missing = [name for name in DESIGN_METRICS if f"\n{name}" not in text]
    assert not missing, missing
    assert gauge(live_server, "adsa_images_generated_total") > 0
    assert gauge(live_server, "adsa_kv_cache_capacity_tokens") > 0
    assert gauge(live_server, "process_resident_memory_bytes") > 0  # Prometheus's process collector
    assert ("adsa_num_preemptions_total", ()) in live_server.metrics()  # the engine's swap-outs
    info = {name: dict(labels) for name, labels in live_server.metrics() if name.endswith("_info")}
    assert info["adsa_model_info"] == {"model": "GPT-custom-random", "model_type": "c2i", "image_size": "32"}
    cache = info["adsa_cache_config_info"]
    assert cache["model"] == "GPT-custom-random" and cache["policy"] == "line" and cache["budget"] == "32"
    assert cache["kv_cache_dtype"] == "float32" and int(cache["pool_bytes"]) > 0  # as the engine stores K/V


# --- the small server (one image at a time, queue of 4, fp8 KV cache); the drain test ends it, so it runs last


def test_fp8_kv_cache(small_server, live_server):
    """ADSA_KV_CACHE_DTYPE=fp8 reaches the engine (the CPU casts): e4m3 K/V, valid images."""
    start_up = [Path(srv.log_path).read_text(errors="replace") for srv in (small_server, live_server)]
    assert "KV cache float8_e4m3fn" in start_up[0] and "KV cache float32" in start_up[1]  # as the engine stores it
    with small_server.client() as c:
        assert c.get("/v1/models").json()["data"][0]["kv_cache_dtype"] == "fp8"
        r = c.post("/v1/generate", json={"class_label": 3, "seed": 7, "response_format": "png"})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    wait_for(lambda: idle(small_server))


def test_queue_full_is_429(small_server):
    """The small server queues 5 images (batch 1 + queue 4). Two requests of 5 sent together: whichever arrives
    second finds the first's images in the way (seconds of work) and gets a 429 to retry; the first runs."""

    def post(_) -> httpx.Response:
        with small_server.client() as c:
            return c.post("/v1/generate", json={"class_label": 1, "n": 5})

    with ThreadPoolExecutor(2) as pool:
        rs = list(pool.map(post, range(2)))
    assert sorted(r.status_code for r in rs) == [200, 429]
    refused = next(r for r in rs if r.status_code == 429)
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
    assert "this request adds 5" in error["message"], error
    wait_for(lambda: idle(small_server))


def test_a_request_no_queue_could_hold_is_refused_as_invalid(small_server):
    """6 images where the server can ever queue 5: a 4xx that says so, not a 429 that a retry cannot cure."""
    with small_server.client() as c:
        assert c.get("/v1/models").json()["data"][0]["limits"]["max_images_per_request"] == 5  # what it says
        r = c.post("/v1/generate", json={"class_label": 1, "n": 6})
        o = c.post("/v1/images/generations", json={"prompt": "1", "n": 6})
    assert (r.status_code, o.status_code) == (422, 400) and "retry-after" not in r.headers
    for error in (r.json()["error"], o.json()["error"]):
        assert (error["code"], error["param"]) == ("invalid_request", "n"), error
        assert "6 images in one request: this server queues at most 5" in error["message"], error
    assert idle(small_server)


def test_sigterm_drains_then_exits_0(small_server):
    result: dict = {}

    def in_flight() -> None:
        with small_server.client() as c:
            result["r"] = c.post("/v1/generate", json={"class_label": 2, "n": 4, "seed": 5})

    t = threading.Thread(target=in_flight)
    t.start()
    wait_for(lambda: gauge(small_server, "adsa_num_requests_running") > 0)
    small_server.proc.send_signal(signal.SIGTERM)
    with small_server.client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 503, timeout=5)
        assert c.get("/readyz").json()["error"]["code"] == "draining"
        refused = c.post("/v1/generate", json={"class_label": 1})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    t.join(60)
    r = result["r"]
    assert r.status_code == 200 and len(r.json()["data"]) == 4  # in-flight work finished
    assert small_server.proc.wait(30) == 0, small_server.logs()


@pytest.mark.parametrize("env, message", [
    ({"ADSA_GPT_MODEL": "GPT-Q"}, "unknown GPT preset 'GPT-Q'"),
    ({"ADSA_KV_LOCAL": "100000"}, "kv budget 128 tokens must be larger than prefix 1 + local window 100000"),
    ({"ADSA_KV_POOL_TOKENS": "10"}, "a request with the default settings cannot run: kv budget 128 x 2 sequences"),
])  # fmt: skip
def test_settings_the_model_cannot_run_end_in_one_line_and_status_2(env, message):
    """Found only once the engine has the model, after the port is open: said once, as a bad flag is (status 2),
    not as two tracebacks and status 1."""
    full = {**os.environ, **CPU_ENV, "ADSA_PORT": str(free_port()), **env}
    r = subprocess.run([sys.executable, "-m", "server"], cwd=REPO, env=full, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "exiting: invalid settings for this model: " in r.stderr and message in r.stderr, r.stderr[-3000:]
