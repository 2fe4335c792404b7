"""Liveness and readiness probes (Kubernetes: livenessProbe -> /healthz, readinessProbe -> /readyz)."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import RuntimeDep
from ..errors import ApiError
from ..schemas import Health, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses=error_responses(503))
async def healthz(rt: RuntimeDep) -> Health:
    """The process is alive (503 when the model failed to load or the engine process died: restarting helps)."""
    if rt.load_error is not None:
        raise ApiError(503, "load_failed", rt.load_error)
    if rt.engine is not None and not rt.engine.alive:
        raise ApiError(503, "engine_dead", "the engine process died")
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=error_responses(503))
async def readyz(rt: RuntimeDep) -> Health:
    """Weights loaded and warm-up done; 503 while loading or draining."""
    rt.require_engine()
    return Health(status="ready")
