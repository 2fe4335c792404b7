"""`create_app()`: the FastAPI application (routers, error mapping, middleware, engine life cycle)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adsa_core.engine.client import EngineClient

from .deps import api_key_error, bearer_token
from .errors import ApiError, install_error_handlers
from .logs import RequestContextMiddleware
from .metrics import HTTPMetricsMiddleware
from .routes import routers
from .runtime import Runtime
from .settings import Settings

API_VERSION = "0.1.0"


def create_app(settings: Settings | None = None, engine: EngineClient | None = None) -> FastAPI:
    """settings: default read from ADSA_* variables. engine: an EngineClient (adsa_core.engine.client) to serve
    (tests); None loads the model named by the settings in the background at startup."""
    settings = settings or Settings()
    runtime = Runtime(settings, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="adsa-serve",
        version=API_VERSION,
        summary="LlamaGen autoregressive image generation with an ADSA sparse KV cache",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.openapi = _without_fastapi_validation_bodies(app)  # type: ignore[method-assign]
    install_error_handlers(app, runtime.retry_after_s)
    for router in routers:
        app.include_router(router)
    # added later = further out: metrics also count 413s from the body limit, and its answers (401, 408, 413,
    # 415) pass through CORS, so that a page on another origin can read them
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, api_keys=settings.api_keys,
                       read_timeout_s=settings.read_timeout_s)
    if settings.cors_origins:
        app.add_middleware(
            ApiErrorCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            # any request header: the origins are the limit, and OpenAI's JS SDK sends its own (x-stainless-*)
            allow_headers=["*"],
            expose_headers=["X-Seed", "X-Request-Id"],
        )
    # every route with its full template, for requests answered before the router runs (413) and for
    # FastAPI's own /docs and /openapi.json (app.routes may hold the included routers, not their routes)
    route_table = (*app.routes, *(route for router in routers for route in router.routes))
    app.add_middleware(HTTPMetricsMiddleware, metrics=lambda: runtime.metrics, routes=route_table)
    app.add_middleware(RequestContextMiddleware)  # every response (413s, preflights) carries X-Request-Id
    return app


def _without_fastapi_validation_bodies(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI lists its own 422 body (HTTPValidationError) on every route that parses input and declares no 422 of
    its own. No route answers with it: validation errors take the API's error body (422 on the native routes, which
    declare it; 400 on OpenAI's). Left in, it would mislead a client generated from the schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # FastAPI keeps it as app.openapi_schema
        for operations in schema["paths"].values():
            for operation in operations.values():
                if "HTTPValidationError" in json.dumps(operation.get("responses", {}).get("422", {})):
                    del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    return openapi


class ApiErrorCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight (an origin, method or header not allowed) answered in the API's
    error body like every other error, not as the text "Disallowed CORS origin"."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")  # e.g. "origin, method"
        hints = {"origin": "ADSA_CORS_ORIGINS lists the allowed origins",
                 "method": f"the API takes {', '.join(sorted(set(self.allow_methods) - {'OPTIONS'}))}"}
        why = "; ".join(hints[part] for part in refused.split(", ") if part in hints)
        message = f"CORS preflight refused: {refused} not allowed" + (f" ({why})" if why else "")
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return ApiError(400, "cors_refused", message, headers).response()


class BodyLimitMiddleware:
    """413 for bodies over max_bytes, before anything parses them (declared or streamed length); 408 for a body
    not sent within read_timeout_s. With API keys set, a body is read only after its request showed a valid key
    (every POST route takes one): a client without a key gets its 401 at once and cannot make the server hold
    its body (the routes' own key check is the same function, deps.api_key_error).

    Also reads a POST body without a JSON content type as JSON (_READ_AS_JSON): `curl -d '{...}'` sends
    application/x-www-form-urlencoded, a browser's `fetch(url, {body: JSON.stringify(...)})` text/plain,
    and the API only ever takes JSON bodies. Any other type (application/xml, multipart/form-data) is a 415,
    before the body is read."""

    def __init__(self, app: ASGIApp, max_bytes: int, api_keys: list[str] | None = None,
                 read_timeout_s: float = 30.0):
        self.app, self.max_bytes, self.api_keys, self.read_timeout_s = app, max_bytes, api_keys or [], read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["method"] == "POST" and not _routed(scope):  # the router's 404 or 405, the body never read
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST":
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            if (err := api_key_error(self.api_keys, bearer_token(authorization))) is not None:
                await err.response()(scope, receive, send)
                return
        too_large = ApiError(413, "payload_too_large", f"request body is larger than {self.max_bytes} bytes")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await too_large.response()(scope, receive, send)
            return
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        is_json = ctype == b"application/json" or (ctype.startswith(b"application/") and ctype.endswith(b"+json"))
        if scope["method"] == "POST" and not is_json and ctype not in _READ_AS_JSON:
            received = ctype.decode("latin-1")[:100]
            unsupported = f"Content-Type {received!r} is not supported: send the JSON body as application/json"
            await ApiError(415, "unsupported_media_type", unsupported).response()(scope, receive, send)
            return
        # JSON bodies are small: buffer them (bounded in size and time), then replay to the app
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.read_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                slow = ApiError(408, "request_timeout", f"request body not received within {self.read_timeout_s:g} s")
                await slow.response()(scope, receive, send)
                return
            if message["type"] != "http.request":  # disconnected while sending the body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await too_large.response()(scope, receive, send)
                return
        body, replayed = b"".join(chunks), False
        if scope["method"] == "POST" and ctype in _READ_AS_JSON:
            headers[b"content-type"] = b"application/json"
            # in place, not a copy: the router records the matched route in this same dict, and the
            # metrics middleware outside reads it from there (a copy counted these as "unmatched")
            scope["headers"] = list(headers.items())

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for http.disconnect (is_disconnected() needs it)

        await self.app(scope, replay, send)


def _routed(scope: Scope) -> bool:
    """A route takes this method at this path: elsewhere the router's own 404 or 405 is the answer, not a 401
    or a 415."""
    return any(route.matches(scope)[0] == Match.FULL for route in scope["app"].router.routes)


# types clients send a JSON body as without saying so, read as JSON: none, `curl -d`'s, a browser fetch's of a string
# (FastAPI itself reads application/json and application/*+json as JSON)
_READ_AS_JSON = (b"", b"application/x-www-form-urlencoded", b"text/plain")
