"""The API-side guards of a request handle (adsa_core.engine.client.RequestHandle): a reader that falls more
than MAX_PENDING_EVENTS behind is cancelled and what waited is dropped; a deadline the engine does not
enforce (a stalled core) is enforced here, DEADLINE_GRACE_S after it."""

from __future__ import annotations

import asyncio
import time

import pytest

from adsa_core.engine.client import DEADLINE_GRACE_S, MAX_PENDING_EVENTS, RequestHandle
from adsa_core.engine.request import DeadlineExceeded, Progress, RequestCancelled

pytestmark = pytest.mark.anyio


async def test_a_reader_that_falls_behind_is_cancelled_and_its_events_dropped():
    cancelled: list[str] = []
    handle = RequestHandle("r-1", cancelled.append)
    for i in range(MAX_PENDING_EVENTS):
        handle.deliver(Progress(i, 64))
    assert cancelled == []  # up to the bound: a slow reader is fine
    for i in range(100):  # the engine goes on sending until it sees the abort
        handle.deliver(Progress(i, 64))
    assert cancelled == ["r-1"]  # the engine is told once: its KV is freed at the next step
    assert handle._queue.qsize() == 1  # nothing else held
    with pytest.raises(RequestCancelled, match="stopped reading"):
        await handle.result()


async def test_a_deadline_the_engine_does_not_enforce_ends_the_request():
    cancelled: list[str] = []
    handle = RequestHandle("r-2", cancelled.append, deadline=time.monotonic() + 0.1)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(handle.result(), DEADLINE_GRACE_S + 2)
    assert 0.1 + DEADLINE_GRACE_S - 0.05 < time.monotonic() - t0 < 0.1 + DEADLINE_GRACE_S + 1
    assert cancelled == ["r-2"]
