"""How big the KV pool is, and how many images decode together by default."""

from __future__ import annotations

import torch

from ..config import ConfigError, EngineConfig, GPTConfig, ResolvedCache
from ..kv.pool import FP8, PoolGeometry, kv_storage_dtype, pages_for

CPU_MAX_BATCH = 8  # images decoded together on a CPU when not set: more only adds latency there
MAX_AUTO_BATCH = 512  # the largest default batch (images): the CUDA-graph buckets are captured up to this


def pool_geometry(config: EngineConfig, cfg: GPTConfig, model_dtype: torch.dtype, device: torch.device
                  ) -> PoolGeometry:
    """kv_pool_tokens when set; on CUDA a share of free device memory; on a CPU room for every row of the largest
    batch to hold a whole dense sequence. Raises ConfigError for a storage dtype the device lacks."""
    c = config
    try:
        dtype = kv_storage_dtype(c.kv_cache_dtype, model_dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dtype == FP8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError("kv_cache_dtype fp8 needs a GPU with fp8 support (compute capability 8.9+: L4, H100)")
    if c.kv_pool_tokens is not None:
        return PoolGeometry.for_model(cfg, c.page_size, 1 + pages_for(c.kv_pool_tokens, c.page_size), dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return PoolGeometry.fit_bytes(cfg, c.page_size, dtype, int(free * c.kv_pool_memory_fraction))
    rows = 2 * (c.max_batch_size or CPU_MAX_BATCH)
    return PoolGeometry.for_model(cfg, c.page_size, 1 + rows * pages_for(cfg.seq_len, c.page_size), dtype)


def default_max_batch(geo: PoolGeometry, cache: ResolvedCache, device: torch.device) -> int:
    """Images decoded together when not set: as many CFG images at the default budget as the pool holds (at
    adsa 1/4 the same pool holds four times dense's sequences: that is the point), at most MAX_AUTO_BATCH."""
    if device.type != "cuda":
        return CPU_MAX_BATCH
    per_image = 2 * pages_for(cache.budget, geo.page_size)
    return max(1, min(MAX_AUTO_BATCH, (geo.num_pages - 1) // per_image))
