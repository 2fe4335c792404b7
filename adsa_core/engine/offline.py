"""Run a list of images through the engine synchronously (CLI, fidelity harness, tools).

The engine batches them continuously, `batch_size` images in flight at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import CacheConfig, ConfigError, EngineConfig
from ..loading import LoadedModels
from ..sampling import SamplingParams
from .engine import Engine
from .request import EngineError, Finished, GenerationRequest, InvalidRequest, Progress, RequestStats


@dataclass
class OfflineResult:
    codes: torch.Tensor  # (N, block_size) int64, in request order
    stats: list[RequestStats]
    logprobs: list[torch.Tensor] | None  # per image (block_size, vocab) when requested


def run_offline(
    models: LoadedModels,
    conds: torch.Tensor,
    sampling: SamplingParams,
    seeds: torch.Tensor,
    cache: CacheConfig,
    batch_size: int,
    emb_masks: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
    want_logits: bool = False,
    progress: Callable[[int], None] | None = None,
    spill_limit_bytes: int | None = None,
    kv_cache_dtype: str = "auto",
) -> OfflineResult:
    """conds: labels (N,) or captions (N, 120, C); forced: (N, block_size) teacher-forced tokens."""
    n = len(seeds)
    requests = [
        GenerationRequest(
            condition=int(conds[i]) if conds[i].dim() == 0 else conds[i], seed=int(seeds[i]), sampling=sampling,
            cache=cache, emb_mask=None if emb_masks is None else emb_masks[i],
            forced_tokens=None if forced is None else forced[i], want_logits=want_logits,
        )
        for i in range(n)
    ]
    results: dict[int, Finished] = {}
    run_requests(models, requests, batch_size, results.__setitem__, progress, spill_limit_bytes, kv_cache_dtype)
    ordered = [results[i] for i in range(n)]
    return OfflineResult(
        torch.stack([r.codes for r in ordered]), [r.stats for r in ordered],
        [r.logprobs for r in ordered] if want_logits else None,
    )


def run_requests(
    models: LoadedModels,
    requests: list[GenerationRequest],
    batch_size: int,
    on_finished: Callable[[int, Finished], None],
    progress: Callable[[int], None] | None = None,
    spill_limit_bytes: int | None = None,
    kv_cache_dtype: str = "auto",
) -> None:
    """Run requests (each with its own cache, forcing and logits wish) through one engine, `batch_size`
    images in flight; `on_finished(i, event)` gets request i's result as soon as it is done.
    An invalid request raises ConfigError, a failed one RuntimeError."""
    n = len(requests)
    extra = {} if spill_limit_bytes is None else {"spill_limit_bytes": spill_limit_bytes}
    cfg = EngineConfig(max_batch_size=max(1, min(batch_size, n)), max_queue=n + 1,
                       default_cache=CacheConfig(policy="dense", budget=None),
                       cuda_graphs=models.device.type == "cuda", decode_images=False, kv_cache_dtype=kv_cache_dtype,
                       **extra)
    engine = Engine(models, cfg)
    errors: dict[int, EngineError] = {}
    last = [0] * n

    def sink_for(i: int):
        def sink(ev) -> None:
            if isinstance(ev, EngineError):
                errors[i] = ev
            elif isinstance(ev, Finished):
                if progress is not None:
                    progress(ev.codes.shape[0] - last[i])
                on_finished(i, ev)
            elif isinstance(ev, Progress) and progress is not None:
                progress(ev.tokens_done - last[i])
                last[i] = ev.tokens_done
        return sink

    try:
        for i, req in enumerate(requests):
            engine.submit(dataclasses.replace(req, request_id=str(i)), sink_for(i))
        while engine.has_work and not errors:
            engine.step()
    except InvalidRequest as e:
        raise ConfigError(str(e)) from None
    finally:
        engine.close()
    if errors:
        i, err = next(iter(sorted(errors.items())))
        if isinstance(err, InvalidRequest):
            raise ConfigError(f"request {i}: {err}")
        raise RuntimeError(f"request {i} failed: {type(err).__name__}: {err}")
