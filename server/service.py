"""Generation requests: from an HTTP body to engine requests, and from engine events to responses.

This is the only place that knows both sides (API schemas, engine types); routes stay thin.
`POST /v1/images/generations` (OpenAI) is turned into the same GenerateRequest (a class model reads
its prompt as a class name, adsa_core.classes) and answered in OpenAI's shape.
A request for n images becomes n GenerationRequests with seeds seed .. seed+n-1, submitted together
(all or nothing: the engine core validates and queues them in one place) before the HTTP response starts,
so queue-full and invalid-input errors get real statuses.
Whatever ends a job early (client disconnect, an error in one image, shutdown) cancels every
unfinished image, so its KV pages are freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math
import secrets
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from adsa_core.classes import ClassNames, UnknownClass
from adsa_core.config import CacheConfig
from adsa_core.engine.client import RequestHandle
from adsa_core.engine.request import (
    EngineError,
    Finished,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    PartialImage,
    Progress,
    RequestCancelled,
    RequestFailed,
)
from adsa_core.sampling import SamplingParams

from .errors import ApiError, invalid, to_api_error
from .logs import current_request_id
from .runtime import Runtime
from .schemas import (
    MAX_IMAGES,
    GenerateRequest,
    GenerateResponse,
    GenerationOptions,
    ImageData,
    ImageObject,
    ImagesRequest,
    ImagesResponse,
    ImagesUsage,
    InputTokensDetails,
    ModelCard,
    ModelLimits,
    OutputTokensDetails,
)

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_KEEPALIVE_S = 15.0  # SSE comment while nothing happens, so proxies keep the stream open
_DISCONNECT_POLL_S = 0.25
# per engine, built on first use: thousands of names (ImageNet's synonyms, the demo's emoji)
_class_names: weakref.WeakKeyDictionary[Any, ClassNames] = weakref.WeakKeyDictionary()


@dataclass
class Job:
    """One HTTP generate call: n submitted images."""

    request_id: str  # the HTTP request's (X-Request-Id)
    seed: int
    requests: list[GenerationRequest]
    handles: list[RequestHandle]
    created: int = field(default_factory=lambda: int(time.time()))
    finished: set[int] = field(default_factory=set)  # indexes whose Finished arrived

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Seed": str(self.seed)}  # X-Request-Id: RequestContextMiddleware, on every response

    def cancel_unfinished(self) -> None:
        for i, h in enumerate(self.handles):
            if i not in self.finished:
                h.cancel()


class GenerationService:
    def __init__(self, runtime: Runtime):
        self.rt = runtime

    # --- request -> engine

    async def submit(self, body: GenerateRequest) -> Job:
        """Validate against the loaded model and submit all n images (or none)."""
        engine = self.rt.require_engine()
        info = engine.info
        if body.model is not None and body.model != info.name:
            raise ApiError(
                404, "model_not_found", f"model {body.model!r} is not served here; this is {info.name!r}", param="model"
            )
        if body.response_format is not None and not info.has_decoder:  # asked for images: refuse before any work
            raise no_decoder("response_format")
        conditions = self._conditions(info, body)
        sampling = self._sampling(info, body)
        cache = self._cache(info, body)
        settings = self.rt.settings
        timeout = min(body.timeout_s or settings.request_timeout_s, settings.request_timeout_s)
        preview = 0
        if body.stream:
            preview = settings.preview_every_rows if body.preview_every_rows is None else body.preview_every_rows
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        job = Job(current_request_id(), seed, [], [])
        # engine ids stay unique when clients reuse an X-Request-Id, and start with it for the logs
        engine_id = f"{job.request_id}-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + timeout
        for i, (cond, prompt) in enumerate(conditions):
            job.requests.append(
                GenerationRequest(
                    condition=cond,
                    prompt=prompt,
                    progress=body.stream,
                    seed=seed + i,
                    sampling=sampling,
                    cache=cache,
                    deadline=deadline,
                    preview_every_rows=preview,
                    request_id=f"{engine_id}-{i}",
                )
            )
        try:
            job.handles = await engine.submit(job.requests)  # all or nothing
        except InvalidRequest as e:  # the engine core's one validation, its field named in this API's words
            raise invalid(str(e), _param_of(e.field, body)) from None
        return job

    @staticmethod
    def _conditions(info: ModelInfo, body: GenerateRequest) -> list[tuple[int | None, str | None]]:
        """(class label, prompt) per image; the engine core checks them against the model."""
        n = body.image_count
        if info.model_type == "t2i":
            if body.prompt is None:
                raise invalid("this is a text-to-image model: give a prompt, not class labels", _condition_param(body))
            return [(None, body.prompt)] * n  # the core encodes the prompt (it owns the text encoder)
        if body.prompt is not None:
            raise invalid(
                "this is a class-conditional model: give class_label or class_labels, not a prompt "
                "(POST /v1/images/generations takes a class name as the prompt)",
                "prompt",
            )
        labels = body.class_labels if body.class_labels is not None else [body.class_label] * n
        return [(label, None) for label in labels]

    def _sampling(self, info: ModelInfo, body: GenerateRequest) -> SamplingParams:
        given = {k: getattr(body, k) for k in ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")}
        merged = {k: v for k, v in (info.sampling_defaults or {}).items() if k in _SAMPLING_FIELDS}
        merged.update({k: v for k, v in given.items() if v is not None})
        try:
            return SamplingParams(**merged)
        except ValueError as e:
            raise invalid(str(e)) from None

    def _cache(self, info: ModelInfo, body: GenerateRequest) -> CacheConfig | None:
        if body.policy is None and body.kv_budget is None:
            return None  # the engine's default policy and budget
        if body.policy is not None and body.policy not in info.policies:
            raise invalid(f"unknown policy {body.policy!r}; choose one of {', '.join(info.policies)}", "policy")
        default = self.rt.settings.cache_config()
        changes: dict[str, Any] = {}
        if body.policy is not None:
            changes["policy"] = body.policy
        if body.kv_budget is not None:
            changes["budget"] = body.kv_budget
        return dataclasses.replace(default, **changes)  # ConfigError -> 422

    # --- engine -> response

    def _on_finished(self, job: Job, i: int, ev: Finished) -> ImageData:
        job.finished.add(i)
        latency = time.monotonic() - job.requests[i].arrival
        m = self.rt.metrics
        m.request_latency.observe(latency)
        m.queue_time.observe(ev.stats.queue_s)
        self.rt.observe_latency(latency)
        s = ev.stats
        return ImageData(
            index=i,
            seed=job.requests[i].seed,
            b64_json=base64.b64encode(ev.png).decode() if ev.png is not None else None,
            tokens=ev.codes.tolist() if ev.png is None else None,
            kv_stats=dict(
                kv_policy=(job.requests[i].cache or self.rt.settings.cache_config()).policy,
                kv_budget_tokens=s.kv_budget_tokens,
                peak_kv_tokens=s.peak_kv_tokens,
                evictions=s.evictions,
                spilled_bytes=s.spilled_bytes,
                swapped_out=s.swapped_out,
                kv_bytes=s.kv_bytes,
            ),
            timings=dict(queue_s=s.queue_s, run_s=s.run_s),
        )

    async def collect(
        self, job: Job, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> tuple[GenerateResponse, list[Finished]]:
        """Wait for all images; a client disconnect cancels them. Returns the response and the engine's
        results (raw PNGs, token ids)."""
        results: list[Finished | None] = [None] * len(job.handles)

        async def one(i: int) -> None:
            async for ev in job.handles[i].events():
                if isinstance(ev, Finished):
                    results[i] = ev
                    return
            raise RequestFailed("the engine ended the request without a result")

        tasks = [asyncio.create_task(one(i)) for i in range(len(job.handles))]
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=_DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION
                )
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
                if pending and await is_disconnected():
                    raise RequestCancelled("client disconnected")
        finally:
            job.cancel_unfinished()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # retrieve, so nothing logs "never retrieved"
        finished = [ev for ev in results if ev is not None]
        assert len(finished) == len(results)  # every task ended with its Finished, or the wait raised
        data = [self._on_finished(job, i, ev) for i, ev in enumerate(finished)]
        return GenerateResponse(created=job.created, seed=job.seed, data=data), finished

    async def stream(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events of all n images, interleaved as they happen; then done (or error)."""
        # bounded: while the client does not read, events wait in the handles, which cancel a reader
        # that falls too far behind (adsa_core.engine.client.MAX_PENDING_EVENTS)
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=len(job.handles))

        async def pump(i: int) -> None:
            try:
                async for ev in job.handles[i].events():
                    await queue.put((i, ev))
            except Exception as e:  # delivered in order, after the events before it
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(job.handles))]
        sent_rows: dict[int, int] = {}  # index -> tokens_done of the last progress event sent
        first_preview: set[int] = set()
        data: list[ImageData] = []
        start = time.monotonic()
        try:
            while len(data) < len(job.handles):
                try:
                    i, ev = await asyncio.wait_for(queue.get(), _KEEPALIVE_S)
                except asyncio.TimeoutError:  # not the builtin on Python 3.10
                    yield ": keep-alive\n\n"
                    continue
                if isinstance(ev, BaseException):
                    err = to_api_error(ev, self.rt.retry_after_s())
                    yield sse("error", {**err.body(), "index": i})
                    return
                if isinstance(ev, Progress):
                    # one event per completed token row is plenty (engines may report every token)
                    row = max(1, math.isqrt(ev.tokens_total))
                    if ev.tokens_done - sent_rows.get(i, 0) >= row or ev.tokens_done >= ev.tokens_total:
                        sent_rows[i] = ev.tokens_done
                        yield sse("progress", {"index": i, "tokens_done": ev.tokens_done, "total": ev.tokens_total})
                elif isinstance(ev, PartialImage):
                    if i not in first_preview:
                        first_preview.add(i)
                        self.rt.metrics.first_preview.observe(time.monotonic() - job.requests[i].arrival)
                    yield sse(
                        "partial_image",
                        {
                            "index": i,
                            "rows_done": ev.rows_done,
                            "tokens_done": ev.tokens_done,
                            "b64_json": base64.b64encode(ev.png).decode(),
                        },
                    )
                elif isinstance(ev, Finished):
                    img = self._on_finished(job, i, ev)
                    data.append(img)
                    yield sse("image", img.model_dump(mode="json"))
            yield sse(
                "done",
                {
                    "created": job.created,
                    "seed": job.seed,
                    "stats": {
                        "images": len(data),
                        "latency_s": round(time.monotonic() - start, 4),
                        "evictions": sum(d.kv_stats.evictions for d in data),
                        "spilled_bytes": sum(d.kv_stats.spilled_bytes for d in data),
                        "peak_kv_tokens": max((d.kv_stats.peak_kv_tokens for d in data), default=0),
                        "kv_budget_tokens": max((d.kv_stats.kv_budget_tokens for d in data), default=0),
                        "kv_bytes": sum(d.kv_stats.kv_bytes for d in data),
                    },
                },
            )
        finally:
            job.cancel_unfinished()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- OpenAI Images

    def images_request(self, body: ImagesRequest) -> GenerateRequest:
        """The native request an OpenAI images request stands for: its size checked against the model, its prompt
        read as a class name by class models (OpenAI's other parameters are checked by ImagesRequest itself)."""
        engine = self.rt.require_engine()
        info = engine.info
        size = f"{info.image_size}x{info.image_size}"
        if body.size not in (None, "auto", size):
            raise invalid(f"size {body.size!r} is not served: this model makes {size} images (or give auto)", "size")
        if not info.has_decoder:  # OpenAI's answer is images: refuse before any work
            raise no_decoder(None)
        options = body.model_dump(include=set(GenerationOptions.model_fields), exclude_none=True)
        if info.model_type == "t2i":
            return GenerateRequest(**options, prompt=body.prompt)
        names = _class_names.get(engine)
        if names is None:
            names = _class_names[engine] = ClassNames(info.classes, info.num_classes)
        try:
            label = names.resolve(body.prompt)
        except UnknownClass as e:
            raise invalid(f"{e} (GET /v1/models/{info.name} lists the classes)", "prompt") from None
        return GenerateRequest(**options, class_label=label)

    def images_response(self, job: Job, result: GenerateResponse, finished: list[Finished]) -> ImagesResponse:
        """OpenAI's answer; usage counts the model's own tokens, summed over the images: the condition
        positions it read (seq_len + 1 - image tokens: 1 class token, or 120 caption positions) and the
        image tokens it sampled."""
        info = self.rt.require_engine().info
        sampled = sum(ev.codes.numel() for ev in finished)
        read = len(finished) * (info.seq_len + 1) - sampled
        size = info.image_size
        return ImagesResponse(
            created=job.created,
            data=[ImageObject(b64_json=d.b64_json) for d in result.data],
            size=f"{size}x{size}",
            usage=ImagesUsage(
                input_tokens=read,
                input_tokens_details=InputTokensDetails(text_tokens=read),
                output_tokens=sampled,
                output_tokens_details=OutputTokensDetails(image_tokens=sampled),
                total_tokens=read + sampled,
            ),
        )

    # --- models

    def model_card(self) -> ModelCard:
        engine = self.rt.require_engine()
        info, s = engine.info, self.rt.settings
        return ModelCard(
            id=info.name,
            created=self.rt.model_loaded_at,
            model_type=info.model_type,
            image_size=info.image_size,
            num_classes=info.num_classes,
            classes=info.classes,
            class_prompt=_class_prompt(info),
            policies=list(info.policies),
            default_policy=info.default_policy,
            default_budget=info.default_budget,
            min_budget=info.min_budget,
            seq_len=info.seq_len,
            kv_cache_dtype=s.kv_cache_dtype,
            sampling_defaults=dict(info.sampling_defaults or {}),
            limits=ModelLimits(
                max_images_per_request=min(MAX_IMAGES, info.max_images_per_call),  # more are refused (422)
                max_batch_size=info.max_batch_size,
                max_queue=s.max_queue,
                max_body_bytes=s.max_body_bytes,
                request_timeout_s=s.request_timeout_s,
                preview_every_rows=s.preview_every_rows,
            ),
        )


def _class_prompt(info: Any) -> str | None:
    if info.model_type != "c2i":
        return None
    ids = f"the class id as digits (0..{info.num_classes - 1})"
    if not info.classes:
        return f"{ids}: this model's classes have no names"
    return (
        "a class name, case-insensitive: any of a class's name, synonyms or emoji in `classes`; "
        f"or {ids}, which also picks one of several classes that share a name"
    )


def _condition_param(body: GenerateRequest) -> str:
    """The field that holds the request's condition."""
    return "prompt" if body.prompt is not None else "class_labels" if body.class_labels is not None else "class_label"


def _param_of(field: str | None, body: GenerateRequest) -> str | None:
    """The field of `body` an engine refusal names (InvalidRequest.field, in GenerationRequest's words)."""
    if field == "condition":
        return _condition_param(body)
    if field == "cache":
        return "kv_budget" if body.kv_budget is not None else "policy" if body.policy is not None else None
    if field == "n_images":
        return "class_labels" if body.class_labels is not None else "n"
    return {"seed": "seed", "sampling": "cfg_scale"}.get(field or "")


def no_decoder(param: str | None) -> ApiError:
    """Images asked for on a server without a VQ decoder (API.md: 501 no_decoder)."""
    return ApiError(501, "no_decoder", "this server runs without a VQ decoder and makes no images: POST "
                    "/v1/generate without response_format returns the token ids", param=param)


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


__all__ = ["EngineError", "GenerationService", "Job", "sse"]
