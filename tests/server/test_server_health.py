"""/healthz (and its alias /health) fail once the engine is dead, or has gone silent (no report for
ADSA_HEALTH_STALL_S: a step that hangs with work pending); idle is not silent. With the FakeEngine,
then with the real engine-core process (tiny random model on the CPU), stopped with SIGSTOP and
killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest
from server_fake_engine import fake_client
from server_live import TINY_GPT

from adsa_core.config import EngineConfig
from adsa_core.engine.client import DEADLINE_GRACE_S, ProcessEngineClient
from adsa_core.loading import ModelSpec
from server import Settings, create_app

pytestmark = pytest.mark.anyio


async def probe(c: httpx.AsyncClient) -> list[tuple[int, str | None]]:
    """(status, error code) of /healthz and /health."""
    out = []
    for path in ("/healthz", "/health"):
        r = await c.get(path)
        out.append((r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None))
    return out


async def wait_probe(c: httpx.AsyncClient, want: list, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await probe(c)) != want:
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.05)


async def test_dead_engine_fails_health_and_refuses_work():
    async with fake_client() as (c, engine):
        assert await probe(c) == [(200, None)] * 2
        engine.die()
        assert await probe(c) == [(503, "engine_dead")] * 2
        assert (await c.get("/readyz")).status_code == 503
        r = await c.post("/v1/generate", json={"class_label": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


async def test_silent_engine_fails_health_until_it_reports_again():
    async with fake_client(Settings(_env_file=None, health_stall_s=0.2)) as (c, engine):
        await asyncio.sleep(0.4)
        assert await probe(c) == [(200, None)] * 2  # idle for longer than the stall time: it still reports
        engine.stalled = True
        pending = asyncio.create_task(c.post("/v1/generate", json={"class_label": 1}))
        await asyncio.sleep(0.4)
        assert await probe(c) == [(503, "engine_stalled")] * 2
        engine.stalled = False
        assert (await pending).status_code == 200
        assert await probe(c) == [(200, None)] * 2


async def test_real_engine_process_stopped_then_killed():
    """SIGSTOP: a step that hangs with an image pending; SIGCONT: it finishes; SIGKILL: dead."""
    spec = ModelSpec(gpt_config=json.dumps(TINY_GPT), device="cpu")
    engine = ProcessEngineClient(spec, EngineConfig(max_batch_size=2), env={"OMP_NUM_THREADS": "1"})
    app = create_app(Settings(_env_file=None, health_stall_s=1.0), engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            await asyncio.sleep(1.5)
            assert await probe(c) == [(200, None)] * 2  # idle longer than the stall time
            core = engine._proc.pid
            os.kill(core, signal.SIGSTOP)
            try:
                pending = asyncio.create_task(c.post("/v1/generate", json={"class_label": 1, "seed": 1}))
                await wait_probe(c, [(503, "engine_stalled")] * 2)
            finally:
                os.kill(core, signal.SIGCONT)
            r = await pending
            assert r.status_code == 200 and r.json()["data"][0]["tokens"]  # no VQ: token ids
            await wait_probe(c, [(200, None)] * 2)

            os.kill(core, signal.SIGKILL)
            await wait_probe(c, [(503, "engine_dead")] * 2)
            r = await c.post("/v1/generate", json={"class_label": 1})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


async def test_requests_end_by_their_deadline_when_the_engine_process_is_stalled():
    """The core's reaper enforces deadlines; with the core stopped (SIGSTOP) the API side ends requests
    itself, within the grace after their deadline: one the core never acknowledged and one it was running."""
    spec = ModelSpec(gpt_config=json.dumps(TINY_GPT), device="cpu")
    engine = ProcessEngineClient(spec, EngineConfig(max_batch_size=1), env={"OMP_NUM_THREADS": "1"})
    app = create_app(Settings(_env_file=None), engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            loop = asyncio.get_running_loop()
            core = engine._proc.pid
            running = asyncio.create_task(c.post("/v1/generate", json={"class_label": 1, "n": 16, "timeout_s": 2}))
            while engine.stats().running == 0:
                await asyncio.sleep(0.01)
            os.kill(core, signal.SIGSTOP)
            try:
                t0 = loop.time()
                unacknowledged = await c.post("/v1/generate", json={"class_label": 2, "timeout_s": 1})
                assert loop.time() - t0 < 1 + DEADLINE_GRACE_S + 1
                accepted = await running
            finally:
                os.kill(core, signal.SIGCONT)
            for r in (unacknowledged, accepted):
                assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
            assert (await c.post("/v1/generate", json={"class_label": 1})).status_code == 200  # it goes on
