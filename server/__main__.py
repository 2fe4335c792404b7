"""`adsa-serve`: run the HTTP daemon under uvicorn.

Every Settings field is a flag (`kv_budget` -> `--kv-budget`), generated from the class so flags
and ADSA_* variables cannot drift; a flag beats the variable. SIGTERM drains: /readyz turns 503,
new requests get 503, in-flight ones finish (up to drain_timeout_s), then the process exits 0.
A second SIGTERM or Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from types import FrameType
from typing import Any, Literal, get_args, get_origin

import uvicorn
from pydantic import ValidationError

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
        help_ = f"{f.description or ''} (env ADSA_{name.upper()}; default: {default!r})"
        # SUPPRESS: flags not given stay out of the namespace, so environment variables still apply
        if f.annotation is bool:
            p.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        else:
            choices = get_args(f.annotation) if get_origin(f.annotation) is Literal else None
            p.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_, choices=choices)
    return p


def load_settings(argv: list[str] | None = None) -> Settings:
    args = vars(build_parser().parse_args(argv))
    try:
        return Settings(**args)  # init values (flags) take precedence over ADSA_* variables
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            print(f"adsa-serve: invalid setting {loc}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


class DrainingServer(uvicorn.Server):
    """uvicorn closes its listener on the first signal; Kubernetes wants readyz 503 while draining."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_timeout_s: float):
        super().__init__(config)
        self.runtime, self.drain_timeout_s = runtime, drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        runtime.on_fatal = self._fatal

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_task is None and not self.should_exit and self._loop is not None:
            # not recorded in _captured_signals: uvicorn would re-raise it after shutdown (exit -15, not 0)
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            log.info("SIGTERM: draining (up to %.0f s)", self.drain_timeout_s)
            self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.runtime.drain(self.drain_timeout_s)
        except Exception:
            log.exception("drain failed")
        finally:
            self.should_exit = True  # uvicorn now waits for open responses, then runs lifespan shutdown

    def _fatal(self, message: str) -> None:
        log.error("exiting: %s", message)
        self.exit_code = 1
        self.should_exit = True


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
    )
    server = DrainingServer(config, app.state.runtime, settings.drain_timeout_s)
    server.run()
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
