"""What crosses the process boundary between the engine client and the engine core, as msgpack bytes.

One place for both directions, so the two sides cannot drift. Tensors travel as raw bytes with their
dtype and shape (a msgpack extension type), never pickled: finished images as uint8 pixels, codes as
int64. Requests travel as plain fields; t2i prompts as text (the core owns the text encoder).

client -> core   {"t": "add", "batch": n, "reqs": [request, ...]}   all or nothing, answered by an ack
                 {"t": "abort", "ids": [...]}                        cancel; KV is freed at the next step
                 {"t": "abort_all"}, {"t": "stop"}                   shutdown
core -> client   {"t": "ready", "info": {...}, "warmup_s": s}        once, after load and warm-up
                 {"t": "fatal", "error": "..."}                      load or warm-up failed; the core exits
                 {"t": "ack", "batch": n, "error": null | [kind, message, field]}
                 {"t": "out", "events": [[id, kind, payload], ...], "stats": {...} | null, "steps": [[dev, per, rows]]}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import torch

from ..config import CacheConfig
from ..sampling import SamplingParams
from . import request as rq
from .request import EngineStats
from .step_clock import StepTiming

_TENSOR = 1  # msgpack extension type code

_ERRORS: dict[str, type[rq.EngineError]] = {
    cls.kind: cls for cls in (rq.InvalidRequest, rq.QueueFull, rq.EngineDraining, rq.DeadlineExceeded,
                              rq.RequestCancelled, rq.RequestFailed, rq.EngineDead)
}


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        header = msgpack.packb([str(t.dtype).removeprefix("torch."), list(t.shape)])
        body = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return msgpack.ExtType(_TENSOR, header + body)
    raise TypeError(f"cannot send {type(obj).__name__} to the engine core")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _TENSOR:
        return msgpack.ExtType(code, data)
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    dtype, shape = unpacker.unpack()
    body = data[unpacker.tell():]
    if not body:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    arr = np.frombuffer(body, dtype=np.uint8).copy()  # writable, owned: torch may keep it
    return torch.from_numpy(arr).view(getattr(torch, dtype)).reshape(shape)


def dumps(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, default=_default, use_bin_type=True)


def loads(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


# --- requests --------------------------------------------------------------------------------------
def request_to_wire(r: rq.GenerationRequest) -> dict[str, Any]:
    if r.forced_tokens is not None or r.want_logits:
        raise ValueError("teacher forcing and log-probs are offline features: run the Engine directly")
    return {
        "id": r.request_id, "condition": r.condition, "emb_mask": r.emb_mask, "prompt": r.prompt, "seed": r.seed,
        "sampling": dataclasses.asdict(r.sampling),
        "cache": dataclasses.asdict(r.cache) if r.cache is not None else None,
        "priority": r.priority, "deadline": r.deadline, "arrival": r.arrival,  # CLOCK_MONOTONIC: one per host
        "preview_every_rows": r.preview_every_rows, "progress": r.progress,
    }


def request_from_wire(d: dict[str, Any]) -> rq.GenerationRequest:
    return rq.GenerationRequest(
        condition=d["condition"], emb_mask=d["emb_mask"], prompt=d["prompt"], seed=d["seed"],
        sampling=SamplingParams(**d["sampling"]), cache=CacheConfig(**d["cache"]) if d["cache"] else None,
        priority=d["priority"], deadline=d["deadline"], arrival=d["arrival"],
        preview_every_rows=d["preview_every_rows"], progress=d["progress"], request_id=d["id"],
    )


# --- events ----------------------------------------------------------------------------------------
def event_to_wire(rid: str, ev: rq.Event | rq.EngineError) -> list[Any]:
    if isinstance(ev, rq.Progress):
        return [rid, "progress", [ev.tokens_done, ev.tokens_total]]
    if isinstance(ev, rq.PartialImage):
        return [rid, "partial", [ev.tokens_done, ev.rows_done, ev.pixels]]
    if isinstance(ev, rq.Finished):
        return [rid, "finished", [ev.codes, ev.pixels, dataclasses.asdict(ev.stats)]]
    if isinstance(ev, rq.EngineError):
        return [rid, "error", error_to_wire(ev)]
    raise TypeError(f"unknown event {type(ev).__name__}")


def event_from_wire(kind: str, payload: list[Any]) -> rq.Event | rq.EngineError:
    if kind == "progress":
        return rq.Progress(*payload)
    if kind == "partial":
        return rq.PartialImage(*payload)
    if kind == "finished":
        codes, pixels, stats = payload
        return rq.Finished(codes, pixels, rq.RequestStats(**stats))
    if kind == "error":
        return error_from_wire(payload)
    raise ValueError(f"unknown event kind {kind!r}")


def error_to_wire(err: rq.EngineError) -> list[str | None]:
    return [err.kind, str(err), err.field if isinstance(err, rq.InvalidRequest) else None]


def error_from_wire(payload: list[str | None]) -> rq.EngineError:
    kind, message, *rest = payload  # field: InvalidRequest's only
    field = rest[0] if rest else None
    cls = _ERRORS.get(str(kind), rq.RequestFailed)
    return rq.InvalidRequest(str(message), field) if cls is rq.InvalidRequest else cls(message)


def stats_to_wire(s: EngineStats) -> dict[str, Any]:
    return dataclasses.asdict(s)


def stats_from_wire(d: dict[str, Any]) -> EngineStats:
    return EngineStats(**d)


def timings_from_wire(rows: list[list[float]]) -> list[StepTiming]:
    return [StepTiming(device_s, period_s, int(n)) for device_s, period_s, n in rows]
