"""Run a list of images through the engine synchronously (CLI, fidelity harness, tools).

The engine batches them continuously, `batch_size` images in flight at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import CacheConfig, EngineConfig
from ..loading import LoadedModels
from ..sampling import SamplingParams
from .engine import Engine
from .request import EngineError, Finished, GenerationRequest, Progress, RequestStats


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
) -> OfflineResult:
    """conds: labels (N,) or captions (N, 120, C); forced: (N, block_size) teacher-forced tokens."""
    n = len(seeds)
    extra = {} if spill_limit_bytes is None else {"spill_limit_bytes": spill_limit_bytes}
    cfg = EngineConfig(device=str(models.device), max_batch_size=max(1, min(batch_size, n)), max_queue=n + 1,
                       default_cache=cache, cuda_graphs=models.device.type == "cuda", decode_images=False, **extra)
    engine = Engine(models, cfg)
    results: dict[int, Finished] = {}
    errors: dict[int, EngineError] = {}
    last = [0] * n

    def sink_for(i: int):
        def sink(ev) -> None:
            if isinstance(ev, EngineError):
                errors[i] = ev
            elif isinstance(ev, Finished):
                results[i] = ev
                if progress is not None:
                    progress(ev.codes.shape[0] - last[i])
            elif isinstance(ev, Progress) and progress is not None:
                progress(ev.tokens_done - last[i])
                last[i] = ev.tokens_done
        return sink

    for i in range(n):
        cond = conds[i]
        req = GenerationRequest(
            condition=int(cond) if cond.dim() == 0 else cond, seed=int(seeds[i]), sampling=sampling,
            emb_mask=None if emb_masks is None else emb_masks[i],
            forced_tokens=None if forced is None else forced[i], want_logits=want_logits, request_id=str(i),
        )
        engine.submit(req, sink_for(i))
    while engine.has_work:
        engine.step()
    engine.close()
    if errors:
        i, err = next(iter(sorted(errors.items())))
        raise RuntimeError(f"image {i} failed: {err}")
    ordered = [results[i] for i in range(n)]
    return OfflineResult(
        torch.stack([r.codes for r in ordered]), [r.stats for r in ordered],
        [r.logprobs for r in ordered] if want_logits else None,
    )
