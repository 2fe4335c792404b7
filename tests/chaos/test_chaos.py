"""Chaos scenarios against the real daemon (tiny model, CPU), each bounded in time. What must hold: no
request outlives its deadline, no 5xx for a client's fault, the API process's memory comes back after the
storm, every accepted request is answered (a full stream or a JSON error), refusals come before the stream."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from chaos_helpers import AUTH, READ_TIMEOUT_S, Scenario
from server_live import LiveServer

from adsa_core.engine.client import DEADLINE_GRACE_S


def metric(srv: LiveServer, name: str, **labels: str) -> float:
    return srv.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def engine_pid(srv: LiveServer) -> int:
    return int(Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()[0])


def wait_idle(srv: LiveServer, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while metric(srv, "adsa_kv_cache_used_tokens") or metric(srv, "adsa_num_requests_waiting") \
            or metric(srv, "adsa_num_requests_running"):
        assert time.monotonic() < deadline, "the server did not return to idle"
        time.sleep(0.05)


def streamed(srv: LiveServer, body: dict, deadline_s: float = 30) -> tuple[int, list[str], dict]:
    """(status, SSE event names, the JSON error of a refusal) of one streamed request."""
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=deadline_s) as c, \
            c.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [], r.json()["error"]
        return 200, [line[7:] for line in r.iter_lines() if line.startswith("event: ")], {}


def test_overload_burst_refuses_before_the_stream(chaos_server, chaos_rows):
    """240 streamed requests, 24 at a time, into a capacity of 6 images: each is a 429 before the stream or a
    full stream (never a 200 that turns into a queue_full error), and every refusal is counted."""
    rejected0 = metric(chaos_server, "adsa_requests_total", status="rejected")
    with Scenario(chaos_rows, chaos_server.proc.pid, "overload: 240 streamed requests, 24 at a time, "
                  "capacity 6 (`--max-batch-size 2 --max-queue 4`)") as sc, ThreadPoolExecutor(24) as pool:
        for status, events, error in pool.map(lambda i: streamed(chaos_server, {"class_label": i % 10}), range(240)):
            sc.count(status)
            if status == 200:
                assert events[-1] == "done" and "error" not in events, events
            else:
                assert status == 429 and error["code"] == "queue_full", (status, error)
    assert sc.row.outcomes["200"] > 0 and sc.row.outcomes["429"] > 0
    assert metric(chaos_server, "adsa_requests_total", status="rejected") - rejected0 == sc.row.outcomes["429"]
    wait_idle(chaos_server)


def test_a_burst_of_capacity_is_admitted_whole(chaos_server, chaos_rows):
    """Seven images arrive together (the core is stopped meanwhile): 2 start, 4 wait, the seventh is refused."""
    core = engine_pid(chaos_server)
    with Scenario(chaos_rows, chaos_server.proc.pid, "burst of 7 one-image requests into capacity 6") as sc, \
            ThreadPoolExecutor(7) as pool:
        os.kill(core, signal.SIGSTOP)
        try:
            futures = [pool.submit(lambda: chaos_server.client(headers=AUTH).post(
                "/v1/generate", json={"class_label": 1})) for _ in range(7)]
            time.sleep(1.0)
        finally:
            os.kill(core, signal.SIGCONT)
        for f in futures:
            sc.count(f.result().status_code)
    assert sc.row.outcomes == {"200": 6, "429": 1}


def _raw(srv: LiveServer, head: bytes, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.setblocking(False)
    with contextlib.suppress(BlockingIOError):  # what the socket takes now: the server need not read it all
        s.send(head + body)
    s.settimeout(READ_TIMEOUT_S + 5)
    return s


def _answer(s: socket.socket) -> str:
    """The status of the server's answer, or 'closed' for a connection closed without one ('hang': neither)."""
    try:
        data = s.recv(4096)
    except TimeoutError:
        return "hang"
    except ConnectionResetError:
        return "closed"
    finally:
        s.close()
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"


def _healthz_latencies(srv: LiveServer, stop: threading.Event, out: list[float]) -> None:
    with srv.client() as c:
        while not stop.is_set():
            t0 = time.monotonic()
            assert c.get("/healthz").status_code == 200
            out.append(time.monotonic() - t0)
            time.sleep(0.02)


def test_slow_and_unauthenticated_clients_pin_nothing(chaos_server, chaos_rows):
    """120 raw connections: partial headers (closed after the read timeout), a body that stops (408), and
    600 KB bodies without a key (401 before the body is read). /healthz stays fast; memory comes back."""
    url = b"POST /v1/generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    latencies: list[float] = []
    stop = threading.Event()
    probe = threading.Thread(target=_healthz_latencies, args=(chaos_server, stop, latencies))
    with Scenario(chaos_rows, chaos_server.proc.pid, "slow clients: 40 partial heads, 40 stalled bodies, "
                  "40 bodies of 600 KB without a key") as sc:
        probe.start()
        t0 = time.monotonic()
        socks = [("head", _raw(chaos_server, url)) for _ in range(40)]
        socks += [("body", _raw(chaos_server, url + b"Authorization: Bearer chaos-key\r\nContent-Length: 1000\r\n\r\n",
                                b'{"class_label"')) for _ in range(40)]
        socks += [("nokey", _raw(chaos_server, url + b"Content-Length: 600000\r\n\r\n", b"{" + b" " * 599_998 + b"}"))
                  for _ in range(40)]
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda ks: (ks[0], _answer(ks[1])), socks))
        elapsed = time.monotonic() - t0
        stop.set()
        probe.join()
        for _, answer in answers:
            sc.count(answer)
            sc.row.hangs += answer == "hang"
    assert Counter(answers) == {("head", "closed"): 40, ("body", "408"): 40, ("nokey", "401"): 40}
    assert elapsed < READ_TIMEOUT_S + 4
    assert max(latencies) < 0.5, max(latencies)
    before, _, after = sc.row.rss
    assert after - before < 30, sc.row.rss


def test_a_body_trickling_after_an_early_answer_is_cut_off(chaos_server, chaos_rows):
    """A client without a key gets its 401 before its body is read, then keeps sending that body a byte at a
    time: the connection is closed within the read timeout, not held for as long as the bytes come."""
    head = b"POST /v1/generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    with Scenario(chaos_rows, chaos_server.proc.pid, "a body trickling in after its 401, one byte every 0.1 s") as sc:
        s = socket.create_connection(("127.0.0.1", chaos_server.port))
        s.sendall(head + b"{")
        s.settimeout(READ_TIMEOUT_S + 5)
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
        t0, closed_after = time.monotonic(), None
        while closed_after is None and time.monotonic() - t0 < READ_TIMEOUT_S + 5:
            try:
                s.sendall(b" ")
                s.settimeout(0.1)
                if s.recv(1) == b"":  # the server closed it
                    closed_after = time.monotonic() - t0
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - t0
        s.close()
        sc.count("401, then closed" if closed_after is not None else "held open")
        sc.row.hangs += closed_after is None
    assert closed_after is not None and closed_after < READ_TIMEOUT_S + 1.5, closed_after


def test_large_validation_errors_do_not_stall_the_loop(chaos_server, chaos_rows):
    """Four ~900 KB bodies of unknown keys, with a valid key: one short 422 each, and /healthz stays fast."""
    body = json.dumps({"class_label": 1, **{f"k{i}": 1 for i in range(70_000)}})
    latencies: list[float] = []
    stop = threading.Event()
    probe = threading.Thread(target=_healthz_latencies, args=(chaos_server, stop, latencies))
    with Scenario(chaos_rows, chaos_server.proc.pid, "4 x 4 bodies of 70,000 unknown keys (900 KB)") as sc:
        probe.start()
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda _: chaos_server.client(headers=AUTH).post(
                "/v1/generate", content=body, headers={"Content-Type": "application/json"}), range(16)))
        stop.set()
        probe.join()
        for r in rs:
            sc.count(r.status_code)
            assert r.status_code == 422 and len(r.content) < 2000, (r.status_code, len(r.content))
            assert "70000 unknown fields" in r.json()["error"]["message"]
    assert max(latencies) < 0.5, max(latencies)


def test_a_reader_that_stops_reading_holds_no_engine_work(chaos_server, chaos_rows):
    """A streamed request whose client never reads. The tiny model's whole stream (~30 KB) fits in the socket
    and transport buffers, so here it runs to completion and the server goes idle; a stream that backs up
    further is cancelled at MAX_PENDING_EVENTS (tests/engine/test_request_handle.py)."""
    body = json.dumps({"class_label": 3, "n": 6, "stream": True}).encode()
    with Scenario(chaos_rows, chaos_server.proc.pid, "a client that never reads its stream (6 images)") as sc:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        s.connect(("127.0.0.1", chaos_server.port))
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer chaos-key\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_idle(chaos_server, timeout=30)
        status, events, _ = streamed(chaos_server, {"class_label": 1})
        sc.count(status)
        s.close()
    assert status == 200 and events[-1] == "done"


def test_requests_end_by_their_deadline_when_the_engine_stalls(chaos_server, chaos_rows):
    """The engine core is stopped (SIGSTOP) with a streamed request running and more arriving: every request
    ends by its deadline + the grace, with 504 / a deadline_exceeded event; nothing hangs."""
    core = engine_pid(chaos_server)
    out: list[tuple[str, float, object]] = []

    def running_stream() -> None:
        t0 = time.monotonic()
        with httpx.Client(base_url=chaos_server.url, headers=AUTH, timeout=30) as c, c.stream(
                "POST", "/v1/generate", json={"class_label": 1, "n": 4, "stream": True, "timeout_s": 3}) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if events == ["progress"]:
                        os.kill(core, signal.SIGSTOP)
        out.append(("stream", time.monotonic() - t0 - 3, events[-1]))

    def json_request(_: int) -> None:
        t0 = time.monotonic()
        r = chaos_server.client(headers=AUTH).post("/v1/generate", json={"class_label": 1, "timeout_s": 2})
        out.append(("json", time.monotonic() - t0 - 2, r.status_code))

    with Scenario(chaos_rows, chaos_server.proc.pid, "engine stalled (SIGSTOP): 1 running stream, 4 JSON "
                  "requests, deadlines 2-3 s") as sc:
        try:
            t = threading.Thread(target=running_stream)
            t.start()
            time.sleep(0.5)
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(json_request, range(4)))
            t.join(30)
        finally:
            os.kill(core, signal.SIGCONT)
        for _, overrun, outcome in out:
            sc.count(504 if outcome == "error" else outcome)
            sc.row.hangs += overrun > DEADLINE_GRACE_S + 1.5
    assert sorted(o for k, _, o in out if k == "json") == [504] * 4
    assert [o for k, _, o in out if k == "stream"] == ["error"]
    assert sc.row.hangs == 0, out
    wait_idle(chaos_server)


def test_disconnect_storm_frees_everything(chaos_server, chaos_rows):
    """30 streamed clients hang up after their first progress event: all their images are cancelled."""
    def hang_up(i: int) -> str:
        with httpx.Client(base_url=chaos_server.url, headers=AUTH, timeout=30) as c, c.stream(
                "POST", "/v1/generate", json={"class_label": i % 10, "stream": True}) as r:
            if r.status_code != 200:
                return str(r.status_code)
            for line in r.iter_lines():
                if line.startswith("event: progress"):
                    return "hung up"
        return "finished"

    with Scenario(chaos_rows, chaos_server.proc.pid, "30 streamed clients hang up mid-image") as sc, \
            ThreadPoolExecutor(10) as pool:
        for outcome in pool.map(hang_up, range(30)):
            sc.count(outcome)
    wait_idle(chaos_server)
    assert set(sc.row.outcomes) <= {"hung up", "finished", "429"}


def test_ctrl_c_after_sigterm_stops_now_with_json_errors(chaos_rows):
    """SIGTERM drains; a second signal (here Ctrl-C) ends the requests in flight with a JSON 503 draining at
    once and the process exits 0, without a traceback; a long drain timeout is not waited for."""
    srv = LiveServer("signals", {"ADSA_MAX_BATCH_SIZE": "1", "ADSA_DRAIN_TIMEOUT_S": "120"})
    try:
        srv.wait_ready()
        with Scenario(chaos_rows, srv.proc.pid, "SIGTERM then Ctrl-C with 5 images in flight") as sc, \
                ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(lambda i: srv.client().post("/v1/generate", json={"class_label": i}), i)
                       for i in range(5)]
            while metric(srv, "adsa_num_requests_running") == 0:
                time.sleep(0.01)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            srv.proc.send_signal(signal.SIGINT)
            for f in futures:
                r = f.result()
                sc.count(r.status_code)
                assert r.status_code == 200 or r.json()["error"]["code"] == "draining", r.text
            assert srv.proc.wait(15) == 0
            assert time.monotonic() - t0 < 10
        assert sc.row.outcomes["503"] > 0
        assert "Traceback" not in srv.logs() and "KeyboardInterrupt" not in srv.logs()
    finally:
        srv.stop()


def test_ctrl_c_twice_exits_at_once_and_leaves_nothing_behind(chaos_rows, tmp_path):
    """A second Ctrl-C (the forced exit) with requests in flight on an engine that does not answer (stopped,
    SIGSTOP): the process exits at once with status 0 and without a traceback, every request in flight gets its
    JSON 503 `draining`, the engine core is killed and its socket directory removed. (A new-user trial found
    the directory left in /tmp and a traceback; a review found text 500s where the engine did not answer.)"""
    srv = LiveServer("ctrl-c-twice", {"ADSA_MAX_BATCH_SIZE": "1", "TMPDIR": str(tmp_path)})
    try:
        srv.wait_ready()
        core = engine_pid(srv)
        assert list(tmp_path.glob("adsa-ipc-*"))  # where the sockets live while it serves
        with Scenario(chaos_rows, srv.proc.pid, "Ctrl-C twice, 0.3 s apart, engine stopped, 4 images in flight") \
                as sc, ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(lambda i: srv.client().post("/v1/generate", json={"class_label": i}), i)
                       for i in range(4)]
            while metric(srv, "adsa_num_requests_running") == 0:
                time.sleep(0.01)
            os.kill(core, signal.SIGSTOP)  # the first Ctrl-C's abort then ends nothing: only the forced exit can
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            srv.proc.send_signal(signal.SIGINT)
            assert srv.proc.wait(15) == 0
            assert time.monotonic() - t0 < 5
            for f in futures:
                r = f.result()
                sc.count(r.status_code)
                assert r.status_code == 503 and r.json()["error"]["code"] == "draining", r.text
        deadline = time.monotonic() + 5
        while Path(f"/proc/{core}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{core}").exists(), "the engine core outlived its server"
        assert not list(tmp_path.glob("adsa-ipc-*"))
        logs = srv.logs()
        assert "SIGINT again: exiting now" in logs  # the forced path ran
        assert "Traceback" not in logs and "KeyboardInterrupt" not in logs, logs
    finally:
        srv.stop()
