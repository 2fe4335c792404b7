"""What crosses the engine boundary (requests in, events out, typed errors, stats) and the engine's own record
of a request (`EngineRequest`).

The server maps these errors onto HTTP status codes; nothing here knows about HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import CacheConfig
from ..kv.spill import SpillRecord
from ..sampling import SamplingParams
from .scheduler import Schedulable


class EngineError(Exception):
    """Base class; `kind` is a stable machine-readable name for API error bodies."""

    kind = "engine_error"


class InvalidRequest(EngineError):
    """The request can never run (bad label, impossible budget, ...). HTTP 422."""

    kind = "invalid_request"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        # what is at fault, in GenerationRequest's words ("condition", "cache", "seed", "sampling",
        # "forced_tokens"; "n_images": how many were submitted together); the server names its own field from
        # it. None: not one field
        self.field = field


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


class EngineDead(EngineError):
    """The engine-core process died: every request in flight ends with this; the server exits. HTTP 503."""

    kind = "engine_dead"


@dataclass
class GenerationRequest:
    """One image. A request of n images is n of these with seeds seed, seed+1, ..."""

    condition: int | torch.Tensor | None  # class label (c2i) or caption features (120, caption_dim) (t2i)
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
    prompt: str | None = None  # t2i: encoded into condition/emb_mask by the engine at submission
    progress: bool = True  # send a Progress event per completed token row (streaming clients)


@dataclass
class Progress:
    tokens_done: int
    tokens_total: int


@dataclass
class PartialImage:
    tokens_done: int
    rows_done: int
    pixels: torch.Tensor | None  # (rows_px, W, 3) uint8, the completed rows only (the engine's output)
    png: bytes | None = None  # the same, PNG-encoded (by the engine client, off both loops)


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
    pixels: torch.Tensor | None  # (H, W, 3) uint8; None when the engine runs without a VQ decoder
    stats: RequestStats
    logprobs: torch.Tensor | None = None  # (block_size, vocab) fp32 when want_logits
    png: bytes | None = None  # the image PNG-encoded (by the engine client, off both loops)


Event = Progress | PartialImage | Finished


@dataclass
class ModelInfo:
    """What the engine core tells the API process about what it serves (sent once, at ready)."""

    name: str  # model id, e.g. "emoji-demo" or a checkpoint's file stem
    model_type: str  # "c2i" or "t2i"
    image_size: int  # pixels per side
    num_classes: int  # class-conditional models' labels 0..num_classes-1 (0 for t2i)
    classes: list[dict] | None  # [{"id", "name", "emoji"}] when the checkpoint names its classes
    policies: tuple[str, ...]  # KV policies a request may ask for
    default_policy: str
    default_budget: int  # KV slots per sequence when a request asks for none
    min_budget: int  # the smallest budget an evicting policy accepts with the server's prefix and local window
    seq_len: int  # tokens a sequence holds without eviction
    max_batch_size: int  # images decoded together at most
    max_images_per_call: int  # images one submission can ever queue (the queue and the batch): more are invalid
    sampling_defaults: dict = field(default_factory=dict)  # the checkpoint's recommended sampling settings
    kv_cache_dtype: str = ""  # storage dtype of the KV pool, e.g. "bfloat16", "float8_e4m3fn"
    kv_pool_bytes: int = 0  # device bytes of the KV pool
    device: str = ""  # e.g. "cuda:0", "cpu"
    has_text_encoder: bool = False  # t2i: prompts can be encoded
    has_decoder: bool = True  # finished images are decoded to pixels; False: a request gets its token ids alone


@dataclass
class EngineStats:
    """Counters and gauges of one engine (the server exports them; they cross the process boundary)."""

    running: int = 0  # requests with KV in the pool
    waiting: int = 0  # queued (including swapped out)
    kv_capacity_tokens: int = 0  # token slots in the pool (per layer and head)
    kv_used_tokens: int = 0  # slots allocated to running sequences
    kv_pool_bytes: int = 0  # device bytes of the KV pool
    max_batch_size: int = 0  # images decoded together at most
    evictions_total: int = 0  # slot overwrites, summed over sequences, layers and heads
    spilled_bytes_total: int = 0  # K/V bytes copied to pinned CPU memory
    spill_dropped_steps_total: int = 0  # sequence steps whose evicted K/V was not kept: the spill arena was full
    swapped_out_total: int = 0  # requests swapped out to CPU for higher-priority work
    images_total: int = 0  # images finished
    image_chunks_total: int = 0  # VQ decodes of finished images, each padded to the chunk size
    tokens_total: int = 0  # image tokens sampled
    steps_total: int = 0  # decode steps run
    host_busy_s_total: float = 0.0  # host seconds spent inside steps (the loop's busy time)
    last_step_at: float = 0.0  # time.monotonic() of the last completed step (0: none yet)
    requests_total_by_status: dict[str, int] = field(default_factory=dict)  # ended or refused requests by outcome

    def count(self, status: str, n: int = 1) -> None:
        self.requests_total_by_status[status] = self.requests_total_by_status.get(status, 0) + n


Sink = Callable[[Event | EngineError], None]


@dataclass(eq=False, kw_only=True)
class EngineRequest(Schedulable):
    """A submitted request inside the engine: the scheduler's view plus the host's bookkeeping."""

    req: GenerationRequest  # what was asked
    sink: Sink  # receives its events (from the engine and the image stage)
    request_id: str
    n_sampled: int = 0  # image tokens sampled so far
    n_stored: list[int] = field(default_factory=list)  # host mirror of each sequence's valid slots
    started: float = 0.0  # time.monotonic() of its prefill
    stats: RequestStats = field(default_factory=RequestStats)
    cancelled: bool = False  # cancel() was called: it ends at the next step
    spill: list[SpillRecord] = field(default_factory=list)  # per sequence: its evicted K/V in the arena
    logprobs: list[torch.Tensor] = field(default_factory=list)  # per step, when req.want_logits

    # what the sampler's packing reads (sampler.SampledItem)
    @property
    def seed(self) -> int:
        return self.req.seed

    @property
    def sampling(self) -> SamplingParams:
        return self.req.sampling

    @property
    def has_forced(self) -> bool:
        return self.req.forced_tokens is not None

    @property
    def rows(self) -> list[int]:
        return [a.row for a in self.allocs]
