"""The one mapping from failures to HTTP: status, OpenAI's error body, headers.

Every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`: `code` is this
API's stable machine-readable kind (invalid_request, queue_full, ...), `type` its OpenAI category
(invalid_request_error, authentication_error, ...), `param` the request field at fault, if one is.
Engine errors (adsa_core.engine.request), the server's own `ApiError`s, FastAPI validation
errors, malformed JSON and unknown routes all leave through here, so clients see one shape.
"""

from __future__ import annotations

import logging
import math
from typing import Any

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

from .schemas import MAX_ERRORS

log = logging.getLogger("adsa.server")

# OpenAI's error categories by status (its SDK raises one exception class per status as well)
_TYPE_BY_STATUS = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An HTTP error with the API's body shape. Raise it (or an engine error) anywhere in the server."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.param = status, code, message, headers or {}, param

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    """A request the loaded model cannot serve (422; 400 on the OpenAI routes)."""
    return ApiError(422, "invalid_request", message, param=param)


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

# HTTP status -> error code for errors Starlette raises itself (404 route, 405 method, ...)
_HTTP_CODE = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
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
        if status in (500, 504):  # the engine failed the request (503s are refusals: loading, draining)
            log.warning("request failed: %s: %s", exc.kind, exc)
        return ApiError(status, exc.kind, str(exc) or exc.kind, headers)
    if isinstance(exc, ConfigError):
        # adsa_core validates its config dataclasses (CacheConfig) with this
        return invalid(str(exc))
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's 400 for a body json.loads raised on other than JSONDecodeError (nesting deeper than the
        # recursion limit, an integer of > 4300 digits, bytes that are not UTF-8): invalid JSON like the rest
        cause = exc.__cause__
        # what follows a ';' is Python's advice to its own user (sys.set_int_max_str_digits), not to a client
        why = "nested too deeply" if isinstance(cause, RecursionError) else str(cause).split(";")[0]
        return ApiError(422, "invalid_json", f"request body is not valid JSON: {why}")
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODE.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, "internal_error", "internal server error")


def validation_error(exc: RequestValidationError) -> ApiError:
    """One readable line per problem (the first MAX_ERRORS), e.g. "n: Input should be less than or equal to 16";
    `param` is the first field at fault."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(
            422,
            "invalid_json",
            "request body is not valid JSON: "
            + "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors),
        )
    parts, params = [], []
    if len(errors) > MAX_ERRORS:
        parts.append(f"{len(errors)} problems, the first {MAX_ERRORS}")
    for e in errors[:MAX_ERRORS]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        params.append(loc or (e.get("ctx") or {}).get("param"))  # a check across fields names its own
        if loc:
            parts.append(f"{loc}: {msg}")
        elif e.get("type") == "value_error":  # the request model's own checks name their fields
            parts.append(msg)
        elif e.get("type") in _NOT_AN_OBJECT:  # no body, or a JSON list, string or number
            parts.append("the request body must be a JSON object")
        else:
            parts.append(f"request body: {msg}")
    return invalid("; ".join(dict.fromkeys(parts)), params[0] if params else None)


# pydantic error types for a body that is absent or not an object at all
_NOT_AN_OBJECT = {"missing", "model_type", "model_attributes_type", "dict_type"}


def install_error_handlers(app: FastAPI, retry_after=lambda: 1.0) -> None:
    """`retry_after()` gives the current Retry-After estimate (seconds) for 429s."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc, retry_after()).response()

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc).response()

    app.add_exception_handler(RequestValidationError, validation)
    for cls in (ApiError, EngineError, ConfigError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, api_error)
