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
    **error_responses(401, 404, 413, 422, 429, 500, 501, 503, 504),
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


def accept_preference(accept: str, media_type: str) -> tuple[float, int]:
    """(q, index) of the media range in an Accept header that speaks for `media_type`: the most specific one
    that matches (the type itself, then type/*, then */*; RFC 9110, 12.5.1), case-insensitive. (0, -1): none."""
    kind = media_type.split("/")[0]
    specificity = {media_type: 3, f"{kind}/*": 2, "*/*": 1}
    best = (0, 0.0, -1)  # (specificity, q, index)
    for index, item in enumerate(accept.lower().split(",")):
        media_range, *params = (part.strip() for part in item.split(";"))
        rank = specificity.get(media_range, 0)
        if rank > best[0]:
            q = 1.0
            for name, _, value in (param.partition("=") for param in params):
                if name.strip() == "q":
                    try:
                        q = float(value)
                    except ValueError:
                        q = 0.0  # an unreadable weight: not an acceptable type
                    q = min(q, 1.0) if q >= 0 else 0.0  # nan and negative weights: 0
            best = (rank, q, index)
    return best[1], best[2]


def wants_png(body: GenerateRequest, accept: str | None) -> bool:
    if body.response_format is not None:
        return body.response_format == "png"
    if body.image_count != 1 or not accept:
        return False
    # Accept: raw bytes when it weighs image/png above JSON; at equal weights, the range listed first (the same
    # range, as */*: JSON, the API's default)
    png_q, png_index = accept_preference(accept, "image/png")
    json_q, json_index = accept_preference(accept, "application/json")
    return png_q > json_q or (png_q == json_q > 0 and png_index < json_index)


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
