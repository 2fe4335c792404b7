"""Liveness and readiness probes (Kubernetes: livenessProbe -> /healthz, readinessProbe -> /readyz)."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import RuntimeDep
from ..schemas import Health, error_responses

router = APIRouter(tags=["health"])


# HEAD too (`curl -I`, load balancers that probe with it): GET's status and headers; uvicorn drops the body of a
# response to HEAD. FastAPI, unlike Starlette, adds no HEAD to a GET route; kept out of the schema, which would
# repeat GET's operation.
@router.get("/healthz", response_model=Health, responses=error_responses(503))
@router.get("/health", response_model=Health, responses=error_responses(503))
@router.head("/healthz", include_in_schema=False)
@router.head("/health", include_in_schema=False)
async def healthz(rt: RuntimeDep) -> Health:
    """The server is alive: 503 when restarting may help (the model failed to load, the engine died, or it
    has gone silent: no step and no idle report for ADSA_HEALTH_STALL_S). /health is an alias (vLLM's name)."""
    if (err := rt.liveness_error()) is not None:
        raise err
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=error_responses(503))
@router.head("/readyz", include_in_schema=False)
async def readyz(rt: RuntimeDep) -> Health:
    """Weights loaded and warm-up done; 503 while loading or draining."""
    rt.require_engine()
    return Health(status="ready")
