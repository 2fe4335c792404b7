"""What crosses the engine boundary: requests in, events out, typed errors.

The server maps these errors onto HTTP status codes; nothing here knows about HTTP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import CacheConfig
from ..sampling import SamplingParams


class EngineError(Exception):
    """Base class; `kind` is a stable machine-readable name for API error bodies."""

    kind = "engine_error"


class InvalidRequest(EngineError):
    """The request can never run (bad label, impossible budget, ...). HTTP 422."""

    kind = "invalid_request"


class QueueFull(EngineError):
    """Too many requests are waiting; try again later. HTTP 429."""

    kind = "queue_full"


class EngineDraining(EngineError):
    """The engine is shutting down and takes no new work. HTTP 503."""

    kind = "draining"


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it finished. HTTP 504."""

    kind = "deadline_exceeded"


class RequestCancelled(EngineError):
    """The caller cancelled the request (e.g. the client disconnected)."""

    kind = "cancelled"


class RequestFailed(EngineError):
    """The engine hit an internal error while running this request. HTTP 500."""

    kind = "internal_error"


@dataclass
class GenerationRequest:
    """One image. A request of n images is n of these with seeds seed, seed+1, ..."""

    condition: int | torch.Tensor  # class label (c2i) or caption features (120, caption_dim) (t2i)
    seed: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    cache: CacheConfig | None = None  # None: the engine's default policy and budget
    emb_mask: torch.Tensor | None = None  # (120,) caption mask, t2i only
    priority: int = 0  # higher runs first; may swap lower-priority sequences out to CPU
    deadline: float | None = None  # time.monotonic() after which the request fails with DeadlineExceeded
    preview_every_rows: int = 0  # 0: no partial previews; k: a preview each k completed token rows
    forced_tokens: torch.Tensor | None = None  # (block_size,) teacher forcing (fidelity harness)
    want_logits: bool = False  # keep per-step fp32 log-probs of the chosen/forced token (fidelity)
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class Progress:
    tokens_done: int
    tokens_total: int


@dataclass
class PartialImage:
    tokens_done: int
    rows_done: int
    png: bytes  # the completed rows only, cropped


@dataclass
class RequestStats:
    queue_s: float = 0.0  # arrival -> first decode step
    run_s: float = 0.0  # first decode step -> last token
    kv_budget_tokens: int = 0
    peak_kv_tokens: int = 0  # most tokens resident for one sequence in any layer/head
    evictions: int = 0  # slot overwrites summed over sequences, layers and heads
    spilled_bytes: int = 0  # K/V bytes copied to pinned CPU memory
    swapped_out: int = 0  # times this request was swapped out to CPU
    kv_bytes: int = 0  # pool bytes reserved for this request (all its sequences)


@dataclass
class Finished:
    codes: torch.Tensor  # (block_size,) int64 image tokens
    png: bytes | None  # None when the engine runs without a VQ decoder
    stats: RequestStats
    logprobs: torch.Tensor | None = None  # (block_size, vocab) fp32 when want_logits


Event = Progress | PartialImage | Finished
