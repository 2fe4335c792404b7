"""Decode attention over the paged KV pool, with the next ADSA victim chosen in the same pass.

One new query token per sequence attends over the sequence's valid slots. Slots are
order-free (keys carry their RoPE rotation), so a row's slots are gathered through its
block table and the softmax runs over slots 0..n_slots-1. While the values are read anyway,
each slot's redundancy v̂_i·S (S = the row's running sum of unit values, `vsum`) is formed
and the eviction victim for the next step is picked, so the cache is read exactly once per step.

`pool_attention_torch` is the plain-torch oracle (CPU or GPU, fp32 math); `pool_attention`
dispatches to the fused Triton kernel on CUDA tensors when Triton imports, else to the oracle.
"""

from __future__ import annotations

import torch

from .policy import MODE_ADSA, MODE_NONE


def gather_slots(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Per-row slot view of a pool tensor: (P, Hkv, page, *rest) -> (B, Hkv, max_pages * page, *rest).

    Unused block-table entries may hold anything (-1, stale ids): they are clamped to a real
    page here and masked by n_slots afterwards; the Triton kernel never reads them at all.
    """
    P, Hkv, page = cache.shape[:3]
    B, max_pages = block_table.shape
    pages = cache[block_table.long().clamp(0, P - 1)]  # (B, max_pages, Hkv, page, *rest)
    pages = pages.transpose(1, 2)  # (B, Hkv, max_pages, page, *rest)
    return pages.reshape(B, Hkv, max_pages * page, *cache.shape[3:])


def pool_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    inv_norm: torch.Tensor,
    vsum: torch.Tensor,
    block_table: torch.Tensor,
    n_slots: torch.Tensor,
    evict_lo: torch.Tensor,
    evict_hi: torch.Tensor,
    mode: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: returns (out (B, H, D) in q.dtype, victim (B, Hkv) int32, -1 where no candidate)."""
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv  # query heads per kv head (GQA); q head h reads kv head h // G
    k = gather_slots(k_cache, block_table).float()  # (B, Hkv, N, D)
    v = gather_slots(v_cache, block_table).float()  # (B, Hkv, N, D)
    pos = gather_slots(pos_cache, block_table)  # (B, Hkv, N)
    inv = gather_slots(inv_norm, block_table).float()  # (B, Hkv, N)
    N = k.shape[2]
    slot = torch.arange(N, device=q.device)
    valid = slot[None, :] < n_slots.long()[:, None]  # (B, N)

    qg = q.float().reshape(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhnd->bhgn", qg, k) * scale  # (B, Hkv, G, N)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no slot attends to nothing: out = 0
    out = torch.einsum("bhgn,bhnd->bhgd", p, v).reshape(B, H, D).to(q.dtype)

    red = inv * torch.einsum("bhnd,bhd->bhn", v, vsum.float())  # v̂_i·S, orders slots like r_i
    key = torch.where((mode == MODE_ADSA)[:, None, None], red, -pos.float())  # window: oldest first
    cand = (
        valid[:, None, :]
        & (pos >= evict_lo[:, None, None])
        & (pos <= evict_hi[:, None, None])
        & (mode != MODE_NONE)[:, None, None]
    )  # (B, Hkv, N)
    key = key.masked_fill(~cand, float("-inf"))
    best = key.amax(dim=-1, keepdim=True)
    # lowest slot among the maxima, written out rather than trusting argmax's tie order
    idx = torch.where(cand & (key == best), slot, N).amin(dim=-1)
    victim = torch.where(cand.any(dim=-1), idx, -1).to(torch.int32)
    return out, victim


def pool_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    inv_norm: torch.Tensor,
    vsum: torch.Tensor,
    block_table: torch.Tensor,
    n_slots: torch.Tensor,
    evict_lo: torch.Tensor,
    evict_hi: torch.Tensor,
    mode: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the pool plus next-step victim; Triton on CUDA when available, else torch.

    See `pool_attention_torch` for the contract; both return identical victims (ties: lowest slot).
    """
    args = (q, k_cache, v_cache, pos_cache, inv_norm, vsum, block_table, n_slots, evict_lo, evict_hi, mode)
    if q.is_cuda:
        from .kernels import HAS_TRITON

        if HAS_TRITON:
            from .kernels.pool_attention import pool_attention_triton

            return pool_attention_triton(*args, scale)
    return pool_attention_torch(*args, scale)
