"""POST /v1/generate (and the /generate alias): JSON, raw PNG, or server-sent events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..deps import ServiceDep, require_api_key
from ..schemas import GenerateRequest, GenerateResponse, error_responses
from ..service import GenerationService, Job

router = APIRouter(tags=["generate"], dependencies=[Depends(require_api_key)])

_RESPONSES = {
    200: {
        "description": "JSON (default), image/png (response_format png or Accept: image/png with n = 1), "
        "or text/event-stream (stream: true)",
        "content": {"image/png": {}, "text/event-stream": {}},
    },
    **error_responses(401, 404, 413, 422, 429, 500, 503, 504),
}


class JobStream(StreamingResponse):
    """SSE response that cancels the job however the stream ends: disconnect, error, or never started."""

    def __init__(self, job: Job, service: GenerationService):
        super().__init__(
            service.stream(job),
            media_type="text/event-stream",
            headers={**job.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel_unfinished()


def wants_png(body: GenerateRequest, accept: str | None) -> bool:
    if body.response_format is not None:
        return body.response_format == "png"
    # Accept: image/png selects raw bytes for a single image, unless JSON is listed before it
    types = [t.split(";")[0].strip() for t in (accept or "").split(",")]
    first = next((t for t in types if t in ("image/png", "application/json")), None)
    return first == "image/png" and body.image_count == 1


@router.post("/v1/generate", response_model=GenerateResponse, responses=_RESPONSES)
@router.post("/generate", response_model=GenerateResponse, responses=_RESPONSES, include_in_schema=False)
async def generate(
    body: GenerateRequest,
    request: Request,
    service: ServiceDep,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    job = await service.submit(body)
    if body.stream:
        return JobStream(job, service)
    result, finished = await service.collect(job, request.is_disconnected)
    if wants_png(body, accept) and finished[0].png is not None:
        return Response(finished[0].png, media_type="image/png", headers=job.headers)
    return JSONResponse(result.model_dump(mode="json"), headers=job.headers)
