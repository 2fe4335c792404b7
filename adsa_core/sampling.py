"""Token sampling shared by the reference sampler and the engine (the engine's GPU path: sampling_kernel).

Filtering reproduces LlamaGen's `sample()` (temperature, then top-k keeping ties, then
top-p on what is left), vectorised so every row of a batch can carry its own settings.
Randomness is a counter-based hash of (seed, token index): a request's image depends on
its own seed only, never on its batch neighbours or on a shared generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
TIE_MARGIN = 16  # logits kept past the k-th largest when only the top of the vocabulary is sorted
# the k_max values the engine captures a decode step for (see k_max_bucket): topk sizes 64 ... 4096, the
# largest still within PyTorch's one-kernel sort on CUDA (<= 4096 per row) for re-ordering ties; 2048
# because LlamaGen's samplers default to top_k 2000 (a 4096 bucket would sort twice the candidates)
K_BUCKETS = tuple(k - TIE_MARGIN for k in (64, 256, 1024, 2048, 4096))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (LlamaGen's names and defaults for its sample scripts)."""

    cfg_scale: float = 4.0  # > 1 runs a conditional and an unconditional sequence
    cfg_interval: int = -1  # -1: CFG for every token; else only image tokens 0 .. cfg_interval + 1
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False  # arg-max instead of sampling

    def __post_init__(self) -> None:
        for name in ("cfg_scale", "temperature", "top_p"):  # nan passes every comparison below
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.cfg_interval < -1:
            raise ValueError(f"cfg_interval must be -1 or >= 0, got {self.cfg_interval}")
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def cfg_active(self, token_index: int) -> bool:
        """LlamaGen applies CFG to image token j iff cfg_interval == -1 or j <= cfg_interval + 1."""
        return self.uses_cfg and (self.cfg_interval < 0 or token_index <= self.cfg_interval + 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply) on int64 tensors; products stay below 2**63."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x6A09E667) & _M32
    return x ^ (x >> 16)


def uniform_from(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A uniform in [0, 1) for each (seed, position) pair; identical on every device. Shapes (B,)."""
    seeds, positions = seeds.long(), positions.long()
    h = _mix32(seeds)
    h = _mix32(h ^ (seeds >> 32) ^ 0x5BD1E995)
    h = _mix32(h ^ (positions * 0x2545F491))
    return (h >> 8).float() * (1.0 / (1 << 24))


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """LlamaGen's guidance: uncond + (cond - uncond) * scale, in fp32."""
    if torch.is_tensor(scale):
        scale = scale.view(-1, 1)
    return uncond + (cond - uncond) * scale


def k_max_bucket(k_max: int, vocab: int) -> int:
    """Round a batch's largest top_k up to one of a few sizes, so a CUDA graph per size covers every batch.
    0 (some row has no top-k, or the bucket would sort half the vocabulary anyway): sort everything.
    A larger k_max draws the same tokens: see `sample_tokens`."""
    if k_max > 0:
        for b in K_BUCKETS:
            if k_max <= b:
                return b if b + TIE_MARGIN < vocab // 2 else 0
    return 0


def sample_tokens(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    greedy: torch.Tensor,
    k_max: int = 0,
) -> torch.Tensor:
    """logits (B, V) fp32; per-row settings (B,). Returns tokens (B,) int64. No host sync, static shapes.

    Filtering ranks tokens by value (ties by index); the draw is an inverse CDF over the kept
    probabilities in vocabulary order, which needs no sort: the GPU kernel (adsa_core.sampling_kernel)
    draws the same tokens with one scan.

    k_max > 0 promises every row's top_k is in 1..k_max: then only the k_max + TIE_MARGIN largest
    logits are sorted (torch.topk), not the whole vocabulary. Any k_max >= the rows' top_k (or 0)
    draws the same tokens, unless more than TIE_MARGIN logits tie exactly with a row's k-th largest:
    the kept tokens and their probabilities are the same, and the extra dropped candidates of a larger
    k_max add exact zeros to the sorted sums of top-p.
    """
    B, V = logits.shape
    scaled = logits / temperature.clamp_min(1e-5).view(B, 1)
    if k_max > 0 and k_max + TIE_MARGIN < V // 2:
        vals, order = torch.topk(scaled, k_max + TIE_MARGIN, dim=-1)  # (B, K) descending
        # topk leaves the order of equal logits open (it may depend on K): index order, as the stable sort
        order, by_index = order.sort(dim=-1)
        vals, by_value = vals.gather(1, by_index).sort(dim=-1, descending=True, stable=True)
        order = order.gather(1, by_value)
    else:
        vals, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # (B, V)
    K = vals.shape[1]
    # top-k: drop everything below the k-th largest value (ties with it are kept, as LlamaGen)
    k = top_k.clamp(0, K).view(B, 1)
    kth = vals.gather(1, (k - 1).clamp_min(0))
    p = torch.exp(vals - vals[:, :1]).masked_fill((vals < kth) & (k > 0), 0.0)  # unnormalised, (B, K) sorted
    # top-p over what top-k left: drop tokens once the mass before them exceeds p; keep the first.
    # Sums run in fp64: their rounding then never decides a token, whatever order a kernel adds in.
    p = p.double()
    cum = p.cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1) / cum[:, -1:]
    p = p.masked_fill((before > top_p.view(B, 1)) & (top_p.view(B, 1) < 1.0), 0.0)
    # inverse-CDF draw in vocabulary order; the smallest positive target is the first kept token
    cdf = torch.zeros_like(p[:, :1]).expand(B, V).scatter(1, order, p).cumsum(dim=-1)  # (B, V) fp64
    u = uniform_from(seeds, positions).to(cdf.device).view(B, 1)
    target = (u * cdf[:, -1:]).clamp_min(torch.finfo(torch.float64).tiny)
    j = torch.searchsorted(cdf, target).clamp_max(V - 1).view(B)
    return torch.where(greedy, order[:, 0], j)  # arg-max: sorted position 0, the lowest index of a tie
