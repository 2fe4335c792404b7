"""The one mapping from failures to HTTP: status, `{"error": message, "type": kind}`, headers.

Engine errors (adsa_core.engine.request), the server's own `ApiError`s, FastAPI validation
errors, malformed JSON and unknown routes all leave through here, so clients see one shape.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adsa_core.config import ConfigError
from adsa_core.engine.request import (
    DeadlineExceeded,
    EngineDead,
    EngineDraining,
    EngineError,
    InvalidRequest,
    QueueFull,
    RequestCancelled,
    RequestFailed,
)

log = logging.getLogger("adsa.server")


class ApiError(Exception):
    """An HTTP error with the API's body shape. Raise it (or an engine error) anywhere in the server."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "type": self.kind}, self.status, headers=self.headers)


class NotReady(ApiError):
    def __init__(self, message: str = "the model is still loading or warming up"):
        super().__init__(503, "not_ready", message, {"Retry-After": "5"})


# Engine error class -> HTTP status. Order matters only for subclasses (none today).
_ENGINE_STATUS: dict[type[EngineError], int] = {
    InvalidRequest: 422,
    QueueFull: 429,
    EngineDraining: 503,
    EngineDead: 503,
    DeadlineExceeded: 504,
    RequestFailed: 500,
    # nginx's "client closed request": only metrics and logs ever see it, the client is gone
    RequestCancelled: 499,
}

# HTTP status -> error type for errors Starlette raises itself (404 route, 405 method, ...)
_HTTP_KIND = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def to_api_error(exc: BaseException, retry_after_s: float = 1.0) -> ApiError:
    """Map any exception the server may see onto an ApiError. The only place statuses are chosen."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineError):
        status = next((s for cls, s in _ENGINE_STATUS.items() if isinstance(exc, cls)), 500)
        headers = {}
        if status == 429:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        elif status == 503:
            headers["Retry-After"] = "5"
        return ApiError(status, exc.kind, str(exc) or exc.kind, headers)
    if isinstance(exc, ConfigError):
        # adsa_core validates its config dataclasses (CacheConfig) with this
        return ApiError(422, "invalid_request", str(exc))
    if isinstance(exc, StarletteHTTPException):
        kind = _HTTP_KIND.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, "internal_error", "internal server error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    """One readable line per problem, e.g. "body.n: Input should be less than or equal to 16"."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "invalid_json", "request body is not valid JSON: " + "; ".join(
            str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors
        )
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid_request", "; ".join(parts)


def install_error_handlers(app: FastAPI, retry_after=lambda: 1.0) -> None:
    """`retry_after()` gives the current Retry-After estimate (seconds) for 429s."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc, retry_after()).response()

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        kind, message = _validation_message(exc)
        return ApiError(422, kind, message).response()

    app.add_exception_handler(RequestValidationError, validation)
    for cls in (ApiError, EngineError, ConfigError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, api_error)
