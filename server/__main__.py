"""`adsa-serve`: run the HTTP daemon under uvicorn.

Every Settings field is a flag (`kv_budget` -> `--kv-budget`), generated from the class so flags
and ADSA_* variables cannot drift; a flag beats the variable. SIGTERM drains: /readyz turns 503,
new requests get 503, in-flight ones finish (up to drain_timeout_s), then the process exits 0.
A second SIGTERM or Ctrl-C stops at once: requests in flight end with 503 draining; exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Literal, get_args, get_origin

import h11
import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app
from .logs import configure_logging
from .runtime import Runtime
from .settings import Settings

log = logging.getLogger("adsa.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adsa-serve",
        description="Serve LlamaGen image generation over HTTP with an ADSA sparse KV cache.",
        epilog="Every flag also reads from the environment variable ADSA_<NAME> (flags win).",
    )
    for name, f in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = f.get_default(call_default_factory=True)
        # argparse formats help with %: a description's own "%" (a speed-up) must not be read as one
        help_ = f"{f.description or ''} (env ADSA_{name.upper()}; default: {default!r})".replace("%", "%%")
        # SUPPRESS: flags not given stay out of the namespace, so environment variables still apply
        if f.annotation is bool:
            p.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        else:
            choices = get_args(f.annotation) if get_origin(f.annotation) is Literal else None
            # words read as their variables are (Settings' _lower): --log-level INFO as ADSA_LOG_LEVEL=INFO
            lower = choices is not None and all(isinstance(c, str) and c == c.lower() for c in choices)
            p.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_, choices=choices,
                           type=str.lower if lower else str)
    return p


def misspelt_settings(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ADSA_* variable that is no setting but nearly one (ADSA_MAX_QUEU): pydantic ignores
    it, and the server would run on the default. Others (the load tester's, tests') are not settings at all."""
    names = [f"ADSA_{name.upper()}" for name in Settings.model_fields]
    return [f"adsa-serve: warning: {var} is not a setting and is ignored; did you mean {close[0]}?"
            for var in sorted(environ) if var.startswith("ADSA_") and var not in names
            and not var.startswith("ADSA_LT_")  # tools/device_loadtest.sh's own, which its servers inherit
            if (close := difflib.get_close_matches(var, names, n=1, cutoff=0.85))]


def load_settings(argv: list[str] | None = None) -> Settings:
    args = vars(build_parser().parse_args(argv))
    for warning in misspelt_settings(os.environ):
        print(warning, file=sys.stderr)
    try:
        settings = Settings(**args)  # init values (flags) take precedence over ADSA_* variables
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            print(f"adsa-serve: invalid setting {loc}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    # checked here, on the machine that serves (settings also validate offline, for deploy files), before minutes
    # of loading rather than as a traceback after them
    for name in ("gpt_ckpt", "vq_ckpt"):
        if (path := getattr(settings, name)) is not None and not Path(path).is_file():
            print(f"adsa-serve: invalid setting {name}: no such file: {path}", file=sys.stderr)
            raise SystemExit(2)
    return settings


class DrainingServer(uvicorn.Server):
    """Signals as docs/OPERATIONS.md says: SIGTERM drains (readyz 503, new requests 503, in-flight ones
    finish); Ctrl-C or a second SIGTERM stops now (requests in flight end with 503 `draining`, JSON like
    every error); one signal more exits without waiting, the engine killed (Runtime.abandon). uvicorn's own
    handling closes the listener on the first signal and re-raises it at exit (a KeyboardInterrupt traceback,
    exit -15): not used."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_timeout_s: float):
        super().__init__(config)
        self.runtime, self.drain_timeout_s = runtime, drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._stop_task: asyncio.Task | None = None
        self._stop_asked = False  # a stop-now signal came (its task starts on the loop)
        self._signals = 0
        runtime.on_fatal = self._fatal

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:  # _abandon ended every request and killed the core; what is left before exiting:
            # the requests write their JSON 503s (at exit asyncio cancels what still runs: uvicorn's text 500s),
            if self.server_state.tasks:
                await asyncio.wait(list(self.server_state.tasks), timeout=1)
            # and the app's shutdown, which uvicorn skips when forced (its lifespan, cancelled, logs a traceback)
            if not self.lifespan.shutdown_event.is_set():
                await self.lifespan.shutdown()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        bound = [sock.getsockname() for server in self.servers for sock in server.sockets]
        if bound and isinstance(bound[0], tuple):  # an IP listener (not a unix socket): the real port
            self.runtime.address = (self.runtime.address[0], bound[0][1])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:  # not serving yet
            self.should_exit = True
            return
        self._signals += 1
        if self._signals == 1 and sig == signal.SIGTERM:
            self._loop.call_soon_threadsafe(self._start_drain)
        elif not self._stop_asked:  # decided here, not when the loop gets to it: a busy loop must not need three
            self._stop_asked = True
            self._loop.call_soon_threadsafe(self._start_stop, signal.Signals(sig).name)
        elif not self.force_exit:
            self.should_exit = self.force_exit = True
            self._loop.call_soon_threadsafe(self._abandon, signal.Signals(sig).name)

    def _abandon(self, name: str) -> None:
        log.warning("%s again: exiting now; the engine is killed, requests in flight end with 503 draining", name)
        self.runtime.abandon()

    def _start_drain(self) -> None:
        log.info("SIGTERM: draining (up to %.0f s)", self.drain_timeout_s)
        self._drain_task = asyncio.create_task(self._drain())

    def _start_stop(self, name: str) -> None:
        if self._stop_task is not None:
            return
        log.info("%s: stopping now; requests in flight end with 503 draining", name)
        if self._drain_task is not None:
            self._drain_task.cancel()
        self._stop_task = asyncio.create_task(self._drain(stop_now=True))

    async def _drain(self, stop_now: bool = False) -> None:
        try:
            await self.runtime.drain(self.drain_timeout_s, now=stop_now)
        except asyncio.CancelledError:  # a second signal: _start_stop took over
            return
        except Exception:
            log.exception("shutdown failed")
        self.should_exit = True  # uvicorn now waits for open responses, then runs lifespan shutdown

    def _fatal(self, message: str, status: int) -> None:
        log.error("exiting: %s", message)
        self.exit_code = status
        self.should_exit = True


def header_timeout_h11(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within `seconds`
    of connecting or of its previous response (uvicorn's keep-alive timeout stops at the first byte, so a
    client sending a header a byte at a time would hold its connection forever)."""

    class HeaderTimeoutH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _head_timeout(self) -> None:
            # no request head in time; or, after an answer given before the body was read (401, 413, 404), a body
            # still trickling in: uvicorn discards it, and each byte would restart its keep-alive timer
            waiting = self.conn.their_state is h11.IDLE or self.conn.our_state is h11.DONE
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            head_arrived = self.conn.their_state is not h11.IDLE and self.conn.our_state is not h11.DONE
            if head_arrived and self._head_timer is not None:
                self._head_timer.cancel()  # the body has BodyLimitMiddleware's timeout
                self._head_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._head_timer is None:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        log_config=None,  # uvicorn's loggers go through ours (format, request ids)
        access_log=False,  # server.logs writes the access line, with the request id
        http=header_timeout_h11(settings.read_timeout_s),
    )
    server = DrainingServer(config, app.state.runtime, settings.drain_timeout_s)
    server.run()
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
