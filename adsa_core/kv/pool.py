"""The KV pool: logical page bookkeeping (plain Python) and the physical tensors.

vLLM's split: the scheduler decides which sequence owns which pages through
`PageAllocator`; the runner owns `KVPool`'s tensors and moves bytes.

Physical layout per layer (what the attention kernels read):
  k, v      (P, Hkv, page, D)  keys carry their RoPE rotation, so slots are order-free
  pos       (P, Hkv, page)     int32 token position held by each slot
  stat      (P, Hkv, page)     fp32 per slot: 1/|V| (ADSA redundancy needs v/|v|), or the attention
                               score of rows whose policy scores attention (kv.policy: line)
Page 0 is a scratch page that is never handed out: padded batch rows write there.

K and V are stored in the model's dtype, or in fp8 (e4m3, `kv_cache_dtype="fp8"`): K and V take
half the bytes (position and 1/|V| do not), so the attention reads about half the bytes per step
and a GiB holds ~1.9x the slots. Values are stored unscaled and saturate at +-448 (vLLM's default
fp8 KV format); attention math stays fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GPTConfig

KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def kv_storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's K/V dtype for an EngineConfig.kv_cache_dtype name."""
    if name == "auto":
        return model_dtype
    if name == "fp8":
        return FP8
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")


def to_kv_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as stored in a pool of `dtype`: fp8 saturates at +-FP8_MAX (a plain cast may overflow to NaN)."""
    if dtype == FP8:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def raw(t: torch.Tensor) -> torch.Tensor:
    """A byte view of an fp8 tensor for copies and indexing (not every torch op has fp8 kernels);
    other tensors unchanged."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros that also works where a device has no fill kernel for fp8 (zeroes the bytes)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    raw(t).zero_()
    return t


class PoolExhausted(RuntimeError):
    """Not enough free pages; the scheduler must wait or swap something out."""


class PageAllocator:
    """Free list of page ids 1..num_pages-1 (page 0 is scratch)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError("the KV pool needs at least 2 pages (one is scratch)")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"need {n} pages, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


@dataclass(frozen=True)
class PoolGeometry:
    n_layer: int
    kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    dtype: torch.dtype

    @property
    def capacity_tokens(self) -> int:
        """Usable token slots (per layer and head) over all sequences."""
        return (self.num_pages - 1) * self.page_size

    @property
    def bytes_per_token(self) -> int:
        """K + V + position + stat of one token slot over all layers and heads."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.n_layer * self.kv_heads * (2 * self.head_dim * elem + 4 + 4)

    @property
    def bytes_per_page(self) -> int:
        return self.bytes_per_token * self.page_size

    @classmethod
    def for_model(cls, cfg: GPTConfig, page_size: int, num_pages: int, dtype: torch.dtype) -> PoolGeometry:
        return cls(cfg.n_layer, cfg.kv_heads, cfg.head_dim, page_size, num_pages, dtype)

    @classmethod
    def fit_bytes(cls, cfg: GPTConfig, page_size: int, dtype: torch.dtype, budget_bytes: int) -> PoolGeometry:
        probe = cls.for_model(cfg, page_size, 2, dtype)
        return cls.for_model(cfg, page_size, max(2, budget_bytes // probe.bytes_per_page), dtype)


class KVPool:
    """The physical tensors, one set per layer."""

    def __init__(self, geo: PoolGeometry, device: torch.device):
        self.geo = geo
        shape = (geo.num_pages, geo.kv_heads, geo.page_size, geo.head_dim)
        self.k = [zeros(shape, geo.dtype, device) for _ in range(geo.n_layer)]
        self.v = [zeros(shape, geo.dtype, device) for _ in range(geo.n_layer)]
        self.pos = [torch.zeros(shape[:3], dtype=torch.int32, device=device) for _ in range(geo.n_layer)]
        self.stat = [torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in range(geo.n_layer)]

    def tensors(self) -> list[list[torch.Tensor]]:
        return [self.k, self.v, self.pos, self.stat]

    def read_pages(self, pages: list[int]) -> list[list[torch.Tensor]]:
        """Copies of the given pages of every tensor (for swap-out; fp8 K/V as raw bytes); nesting of `tensors()`."""
        idx = torch.tensor(pages, device=self.k[0].device)
        return [[raw(t).index_select(0, idx) for t in group] for group in self.tensors()]

    def write_pages(self, pages: list[int], data: list[list[torch.Tensor]]) -> None:
        idx = torch.tensor(pages, device=self.k[0].device)
        for group, saved in zip(self.tensors(), data):
            for t, s in zip(group, saved):
                raw(t).index_copy_(0, idx, s.to(t.device, non_blocking=True))
