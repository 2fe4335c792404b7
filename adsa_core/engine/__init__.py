"""Continuous-batching engine over the sparse KV pool (docs/ARCHITECTURE.md is the map)."""

from .client import EngineClient, ProcessEngineClient, RequestHandle
from .engine import Engine
from .request import (
    DeadlineExceeded,
    EngineDead,
    EngineDraining,
    EngineError,
    EngineStats,
    Finished,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    PartialImage,
    Progress,
    QueueFull,
    RequestCancelled,
    RequestFailed,
    RequestStats,
)

__all__ = [
    "DeadlineExceeded", "Engine", "EngineClient", "EngineDead", "EngineDraining", "EngineError", "EngineStats",
    "Finished", "GenerationRequest", "InvalidRequest", "ModelInfo", "PartialImage", "ProcessEngineClient",
    "Progress", "QueueFull", "RequestCancelled", "RequestFailed", "RequestHandle", "RequestStats",
]
