"""`create_app()`: the FastAPI application (routers, error mapping, middleware, engine life cycle)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, install_error_handlers
from .metrics import HTTPMetricsMiddleware
from .routes import routers
from .runtime import Runtime
from .settings import Settings

API_VERSION = "0.1.0"


def create_app(settings: Settings | None = None, engine: Any | None = None) -> FastAPI:
    """settings: default read from ADSA_* variables. engine: an AsyncEngine-like object to serve
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
    install_error_handlers(app, runtime.retry_after_s)
    for router in routers:
        app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Seed"],
        )
    # added last = outermost: metrics also count 413s from the body limit
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(HTTPMetricsMiddleware, metrics=lambda: runtime.metrics)
    return app


class BodyLimitMiddleware:
    """413 for bodies over max_bytes, before anything parses them (declared or streamed length).

    Also reads a POST body without a JSON content type as JSON: `curl -d '{...}'` sends
    application/x-www-form-urlencoded, and the API only ever takes JSON bodies."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, "payload_too_large", f"request body is larger than {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await too_large.response()(scope, receive, send)
            return
        # JSON bodies are small: buffer them (bounded), then replay to the app
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending the body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await too_large.response()(scope, receive, send)
                return
        body, replayed = b"".join(chunks), False
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["method"] == "POST" and ctype in (b"", b"application/x-www-form-urlencoded"):
            headers[b"content-type"] = b"application/json"
            scope = {**scope, "headers": list(headers.items())}

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for http.disconnect (is_disconnected() needs it)

        await self.app(scope, replay, send)
