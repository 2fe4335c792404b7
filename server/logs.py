"""Request ids and logs.

Each HTTP request gets an id: the client's `X-Request-Id` when it is well formed, else a new one. It
is echoed on every response (errors included), lives in a context variable while the request runs,
and a logging filter copies it into every log record written meanwhile, so every line about a
request carries it (`request_id`). The access line (one per request, INFO, logger `adsa.access`)
is written here too. `ADSA_LOG_FORMAT=json` gives one JSON object per line (python-json-logger).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import Literal

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adsa_core.logfmt import log_formatter

from .errors import to_api_error

_request_id: ContextVar[str | None] = ContextVar("adsa_request_id", default=None)
# what we echo and log must be safe in a header and a log line: no spaces, quotes or control characters
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

access_log = logging.getLogger("adsa.access")


def current_request_id() -> str:
    """The id of the HTTP request being served (a fresh one outside any request)."""
    return _request_id.get() or uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Handler filter: stamps each record with the request id of the context that logged it ("-": none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get() or "-"
        return True


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """The root handler (stderr) for the server's and uvicorn's loggers alike (the engine-core process
    formats its own lines the same way: Settings.engine_env passes ADSA_LOG_FORMAT on)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(log_formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class RequestContextMiddleware:
    """The outermost middleware: the request id (set, echoed on the response) and the access line.

    An exception that escapes the app before a response started is answered here (500, the API's
    body), so even that response carries the id; Starlette's own last-resort handler sits outside
    every user middleware and would send it without."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id")
        request_id = incoming if incoming and _WELL_FORMED.fullmatch(incoming) else uuid.uuid4().hex
        token = _request_id.set(request_id)
        start, status = time.perf_counter(), None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if status is not None:  # mid-response: too late for an error body
                raise
            await to_api_error(exc).response()(scope, receive, send_with_id)  # logs the traceback
        finally:
            duration = time.perf_counter() - start
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else "-"
            method, path = scope["method"], scope["path"]
            access_log.info(
                '%s "%s %s" %s %.3fs',
                peer,
                method,
                path,
                status if status is not None else "-",
                duration,
                extra={"client": peer, "method": method, "path": path, "status": status, "duration_s": duration},
            )
            _request_id.reset(token)
