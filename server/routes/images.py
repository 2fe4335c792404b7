"""POST /v1/images/generations: OpenAI's Images API, so the official SDKs work unchanged."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from ..deps import ServiceDep, require_api_key
from ..errors import ApiError, to_api_error, validation_error
from ..schemas import ImagesRequest, ImagesResponse, error_responses


class OpenAIRoute(APIRoute):
    """OpenAI answers a request it cannot serve with 400, where the native API says 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                err = validation_error(e)
            except Exception as e:  # engine errors, ConfigError, ApiError: mapped as on every route
                err = to_api_error(e, request.app.state.runtime.retry_after_s())
            if err.status == 422:
                err = ApiError(400, err.code, err.message, err.headers, err.param)
            raise err

        return route_handler


router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)], route_class=OpenAIRoute)


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    responses=error_responses(400, 401, 404, 413, 429, 500, 501, 503, 504),
)
async def create_images(
    body: ImagesRequest, request: Request, response: Response, service: ServiceDep
) -> ImagesResponse:
    """`n` images of `prompt`: a caption for text models, a class name for class models. The seed of
    image 0 comes back in `X-Seed` (image i used seed + i)."""
    job = await service.submit(service.images_request(body))
    result, finished = await service.collect(job, request.is_disconnected)
    response.headers.update(job.headers)
    return service.images_response(job, result, finished)
