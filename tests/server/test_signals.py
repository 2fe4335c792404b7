"""DrainingServer's signal rule decided in the handler itself: SIGTERM drains, the next signal (or a first
Ctrl-C) stops now, one more exits without waiting, also while the event loop is too busy to have started the
stop (a busy loop is when people press Ctrl-C twice). The live behaviour: tests/chaos/test_chaos.py."""

from __future__ import annotations

import asyncio
import signal

import uvicorn

from server import Settings, create_app
from server.__main__ import DrainingServer


def _server() -> tuple[DrainingServer, asyncio.AbstractEventLoop]:
    app = create_app(Settings(_env_file=None, device="cpu"))
    server = DrainingServer(uvicorn.Config(app), app.state.runtime, drain_timeout_s=1.0)
    loop = asyncio.new_event_loop()  # never run: what the handler schedules waits, as on a busy loop
    server._loop = loop
    return server, loop


def test_ctrl_c_twice_forces_the_exit_before_the_loop_ran_the_stop():
    server, loop = _server()
    try:
        server.handle_exit(signal.SIGINT, None)
        assert not server.force_exit  # the stop now (scheduled)
        server.handle_exit(signal.SIGINT, None)
        assert server.force_exit and server.should_exit
    finally:
        loop.close()


def test_sigterm_drains_then_a_signal_stops_then_one_more_forces():
    server, loop = _server()
    try:
        server.handle_exit(signal.SIGTERM, None)
        server.handle_exit(signal.SIGTERM, None)
        assert not server.force_exit
        server.handle_exit(signal.SIGINT, None)
        assert server.force_exit
    finally:
        loop.close()
