"""The served model, OpenAI `GET /v1/models` style, with what a client needs to build requests."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..deps import ServiceDep, require_api_key
from ..errors import ApiError
from ..schemas import ModelCard, ModelList, error_responses

router = APIRouter(
    prefix="/v1",
    tags=["models"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 503),
)


@router.get("/models", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(data=[service.model_card()])


@router.get("/models/{model_id}", response_model=ModelCard, responses=error_responses(404))
async def get_model(model_id: str, service: ServiceDep) -> ModelCard:
    card = service.model_card()
    if model_id != card.id:
        raise ApiError(404, "model_not_found", f"model {model_id!r} is not served here; this is {card.id!r}")
    return card
