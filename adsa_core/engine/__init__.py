"""Continuous-batching engine over the sparse KV pool."""

from .async_engine import AsyncEngine, ModelInfo, RequestHandle
from .engine import Engine, EngineStats
from .request import (
    DeadlineExceeded,
    EngineDraining,
    EngineError,
    Finished,
    GenerationRequest,
    InvalidRequest,
    PartialImage,
    Progress,
    QueueFull,
    RequestCancelled,
    RequestFailed,
    RequestStats,
)

__all__ = [
    "AsyncEngine", "DeadlineExceeded", "Engine", "EngineDraining", "EngineError", "EngineStats", "Finished",
    "GenerationRequest", "InvalidRequest", "ModelInfo", "PartialImage", "Progress", "QueueFull", "RequestCancelled",
    "RequestFailed", "RequestHandle", "RequestStats",
]
