"""The split between the API process and the engine-core process, on the real daemon (tiny model, CPU):
a request whose work raises fails alone, a client that disconnects frees its KV in the other process, and
a dead engine process ends requests in flight with a 503 at once and makes the server exit non-zero (so
its supervisor restarts it)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_live import LiveServer


def metric(srv: LiveServer, name: str, **labels: str) -> float:
    return srv.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def engine_pid(srv: LiveServer) -> int:
    """The engine-core process: the server's only child."""
    children = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@pytest.fixture(scope="module")
def faulty_server():
    """Two images at a time; requests whose id contains 'fault-me' raise inside the engine step; a whole
    step raises while a request whose id contains 'step-fault' runs."""
    srv = LiveServer("faulty", {"ADSA_MAX_BATCH_SIZE": "2", "ADSA_FAULT_REQUEST_ID": "fault-me",
                                "ADSA_FAULT_STEP_REQUEST_ID": "step-fault", "ADSA_PREVIEW_EVERY_ROWS": "1"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_a_request_whose_step_raises_fails_alone(faulty_server):
    results: dict[str, httpx.Response] = {}

    def post(rid: str) -> None:
        with faulty_server.client() as c:
            results[rid] = c.post("/v1/generate", json={"class_label": 1, "n": 2, "seed": 3},
                                  headers={"X-Request-Id": rid})

    threads = [threading.Thread(target=post, args=(rid,)) for rid in ("fault-me", "fine-1", "fine-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bad = results["fault-me"]
    assert bad.status_code == 500
    err = bad.json()["error"]
    # clients learn which request failed, never the exception's text (that is in the log)
    assert err["code"] == "internal_error" and "fault-me" in err["message"] and "injected" not in err["message"]
    assert "injected fault for fault-me" in faulty_server.logs()
    for rid in ("fine-1", "fine-2"):
        assert results[rid].status_code == 200 and len(results[rid].json()["data"]) == 2
    wait_for(lambda: metric(faulty_server, "adsa_kv_cache_used_tokens") == 0)


def test_a_failing_step_fails_its_batch_only_and_queued_requests_survive(faulty_server):
    """The core is stopped while three requests arrive, so it takes them in order: 'step-fault' and 'co-runner'
    make the batch (two images), 'queued' waits. The step raises: the batch fails with a generic message naming
    each request, the exception and the ids go to the log, the queued request runs."""
    core = engine_pid(faulty_server)
    results: dict[str, httpx.Response] = {}

    def post(rid: str) -> None:
        with faulty_server.client() as c:
            results[rid] = c.post("/v1/generate", json={"class_label": 1, "seed": 3}, headers={"X-Request-Id": rid})

    os.kill(core, signal.SIGSTOP)
    threads = []
    try:
        for rid in ("step-fault", "co-runner", "queued"):
            threads.append(threading.Thread(target=post, args=(rid,)))
            threads[-1].start()
            time.sleep(0.3)  # in this order into the core's socket
    finally:
        os.kill(core, signal.SIGCONT)
    for t in threads:
        t.join(60)
    for rid in ("step-fault", "co-runner"):
        r = results[rid]
        assert r.status_code == 500, (rid, r.text)
        err = r.json()["error"]
        assert err["code"] == "internal_error" and rid in err["message"] and "injected" not in err["message"]
    assert results["queued"].status_code == 200 and len(results["queued"].json()["data"]) == 1
    log = faulty_server.logs()
    failed_line = next(line for line in log.splitlines() if "engine step failed" in line)
    assert "step-fault" in failed_line and "co-runner" in failed_line and "queued" not in failed_line
    assert "injected step failure" in log
    wait_for(lambda: metric(faulty_server, "adsa_kv_cache_used_tokens") == 0)


def test_a_disconnect_frees_kv_across_the_process_boundary(faulty_server):
    cancelled0 = metric(faulty_server, "adsa_requests_total", status="cancelled")
    images0 = metric(faulty_server, "adsa_images_generated_total")
    with faulty_server.client() as c, c.stream("POST", "/v1/generate",
                                               json={"class_label": 2, "n": 8, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: progress"):
                break  # an image is running: hang up
    wait_for(lambda: metric(faulty_server, "adsa_requests_total", status="cancelled") > cancelled0)
    wait_for(lambda: metric(faulty_server, "adsa_kv_cache_used_tokens") == 0
             and metric(faulty_server, "adsa_num_requests_waiting") == 0)
    assert metric(faulty_server, "adsa_images_generated_total") - images0 < 8  # not run to completion


def test_engine_death_fails_requests_in_flight_and_the_server_exits(faulty_server):
    """Runs last: it ends the module's server."""
    out: dict[str, object] = {}

    def post() -> None:
        t0 = time.monotonic()
        with faulty_server.client() as c:
            out["response"] = c.post("/v1/generate", json={"class_label": 1, "n": 16})
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=post)
    t.start()
    wait_for(lambda: metric(faulty_server, "adsa_num_requests_running") > 0)
    killed = time.monotonic()
    os.kill(engine_pid(faulty_server), signal.SIGKILL)
    t.join(30)
    r = out["response"]
    assert isinstance(r, httpx.Response) and r.status_code == 503, r
    assert r.json()["error"]["code"] == "engine_dead"
    assert time.monotonic() - killed < 10  # at once, not at a timeout
    assert faulty_server.proc.wait(30) != 0  # for compose / Kubernetes to restart it
    log = faulty_server.logs()
    assert "the engine process exited" in log, log[-2000:]
