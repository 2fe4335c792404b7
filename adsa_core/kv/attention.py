"""Decode attention over the paged KV pool, with the next ADSA victim chosen in the same pass.

One new query token per sequence attends over the sequence's valid slots. Slots are
order-free (keys carry their RoPE rotation), so a row's slots are gathered through its
block table and the softmax runs over slots 0..n_slots-1. While the values are read anyway,
each slot's redundancy v̂_i·S (S = the row's running sum of unit values, `vsum`) is formed
and the eviction victim for the next step is picked, so the cache is read exactly once per step.

`pool_attention_torch` is the plain-torch oracle (CPU or GPU, fp32 math); it ranks each row's
candidates by the victim key of the row's policy (kv.policy). `pool_attention` dispatches to the
fused Triton kernel on CUDA tensors when Triton imports and implements every registered policy,
else to the oracle.

`pool_decode` is one engine decode step of one layer: it first writes each row's new token
(into the next free slot, or over the victim the previous step picked, staging what it
overwrites for the spill and updating S), then attends as above. On CUDA the write and the
attention are one kernel launch per layer; `pool_decode_torch` is its oracle and the CPU path.
"""

from __future__ import annotations

import torch

from .decode_state import DecodeRows, LayerState
from .policy import LINE_DECAY, attention_modes, evicting_policies, kernel_covers_registry
from .pool import raw, to_kv_storage


def scores_attention(mode: torch.Tensor) -> torch.Tensor:
    """Which rows (mode: their policies' ids, any shape) keep the attention score a_i in the slot statistic.
    Compares with Python ints: no host-to-device copy, so it may run inside a CUDA graph capture."""
    out = torch.zeros_like(mode, dtype=torch.bool)
    for m in attention_modes():
        out |= mode == m
    return out


def gather_slots(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Per-row slot view of a pool tensor: (P, Hkv, page, *rest) -> (B, Hkv, max_pages * page, *rest).

    Unused block-table entries may hold anything (-1, stale ids): they are clamped to a real
    page here and masked by n_slots afterwards; the Triton kernel never reads them at all.
    """
    P, Hkv, page = cache.shape[:3]
    B, max_pages = block_table.shape
    pages = raw(cache)[block_table.long().clamp(0, P - 1)]  # (B, max_pages, Hkv, page, *rest)
    pages = pages.transpose(1, 2)  # (B, Hkv, max_pages, page, *rest)
    return pages.reshape(B, Hkv, max_pages * page, *cache.shape[3:]).view(cache.dtype)


def pool_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    stat: torch.Tensor,
    vsum: torch.Tensor,
    lse: torch.Tensor,
    block_table: torch.Tensor,
    n_slots: torch.Tensor,
    evict_lo: torch.Tensor,
    evict_hi: torch.Tensor,
    mode: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: returns (out (B, H, D) in q.dtype, victim (B, Hkv) int32, -1 where no candidate).

    Rows of a policy that scores attention (line) also update their slots' score in `stat` and their
    log-sum-exp `lse` (B, H) in place (kv.policy); every row's lse is this step's afterwards."""
    pick = torch.ones_like(n_slots, dtype=torch.bool)
    return _attend(q, k_cache, v_cache, pos_cache, stat, vsum, lse, block_table, n_slots, evict_lo, evict_hi,
                   mode, pick, scale)


def _attend(q, k_cache, v_cache, pos_cache, stat, vsum, lse, block_table, n_slots, evict_lo, evict_hi, mode,
            pick, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """pool_attention_torch, with `mode` the rows' policies and `pick` (B,) bool: which rows choose a victim
    (a line row scores attention from its first step, though it picks only once full)."""
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv  # query heads per kv head (GQA); q head h reads kv head h // G
    if not n_slots.is_cuda and B:  # gather only the pages in use (the host read is free on the CPU)
        block_table = block_table[:, : max(1, -(-int(n_slots.max()) // k_cache.shape[2]))]
    k = gather_slots(k_cache, block_table).float()  # (B, Hkv, N, D)
    v = gather_slots(v_cache, block_table).float()  # (B, Hkv, N, D)
    pos = gather_slots(pos_cache, block_table)  # (B, Hkv, N)
    st = gather_slots(stat, block_table).float()  # (B, Hkv, N)
    N = k.shape[2]
    slot = torch.arange(N, device=q.device)
    valid = slot[None, :] < n_slots.long()[:, None]  # (B, N)

    qg = q.float().reshape(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhnd->bhgn", qg, k) * scale  # (B, Hkv, G, N)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no slot attends to nothing: out = 0
    out = torch.einsum("bhgn,bhnd->bhgd", p, v).reshape(B, H, D).to(q.dtype)

    scoring = scores_attention(mode)
    # a CPU batch without such rows skips their work (the host read is free there; on CUDA no sync, shapes static)
    any_scoring = bool(scoring.any()) if not q.is_cuda else True
    attn, inv = st, st  # the slot statistic: 1/|V| where no row scores attention
    if any_scoring:
        # a_i <- decay a_i + p_i, p_i from the previous step's normaliser and at most 1 (kv.policy, line)
        prev = lse.float().reshape(B, Hkv, G, 1)
        attn = LINE_DECAY * st + torch.exp((s - prev).clamp_max(0.0)).nan_to_num(0.0).sum(dim=2)  # (B, Hkv, N)
        attn = torch.where(valid[:, None, :] & scoring[:, None, None], attn, st)
        _scatter_slots(stat, block_table, attn, valid[:, None, :] & scoring[:, None, None])  # back into the pool
        inv = torch.where(scoring[:, None, None], v.norm(dim=-1).clamp_min(1e-6).reciprocal(), st)  # 1/|V|
    now = torch.logsumexp(s, dim=-1).reshape(B, H)  # -inf for a row with no slot: kept as "none yet"
    lse.copy_(torch.where(now.isfinite(), now, float("inf")))

    red = inv * torch.einsum("bhnd,bhd->bhn", v, vsum.float())  # v̂_i·S, orders slots like r_i
    # the victim keys' units (kv.policy.VictimKey): per row positive factors, so no policy's ranking changes
    n = n_slots.clamp_min(1).float()[:, None, None]
    red, share = red / n, attn * n * (1 - LINE_DECAY)
    key = torch.full_like(red, float("-inf"))
    evicting = torch.zeros_like(mode, dtype=torch.bool)  # rows of a registered policy that evicts
    for policy in evicting_policies():
        rows = mode == policy.mode
        key = torch.where(rows[:, None, None], policy.victim_key(red, pos, share).float(), key)
        evicting |= rows
    cand = (
        valid[:, None, :]
        & (pos >= evict_lo[:, None, None])
        & (pos <= evict_hi[:, None, None])
        & (evicting & pick)[:, None, None]
    )  # (B, Hkv, N)
    key = key.masked_fill(~cand, float("-inf"))
    best = key.amax(dim=-1, keepdim=True)
    # lowest slot among the maxima, written out rather than trusting argmax's tie order
    idx = torch.where(cand & (key == best), slot, N).amin(dim=-1)
    victim = torch.where(cand.any(dim=-1), idx, -1).to(torch.int32)
    return out, victim


def _scatter_slots(cache: torch.Tensor, block_table: torch.Tensor, values: torch.Tensor, where: torch.Tensor) -> None:
    """The inverse of gather_slots for a (P, Hkv, page) tensor: cache[slot] = values where `where` (B, Hkv, N).
    While a CUDA graph is captured (no data-dependent shapes) the other entries go to the scratch page 0, which
    the engine never hands out."""
    P, Hkv, page = cache.shape
    N = values.shape[-1]
    slot = torch.arange(N, device=values.device)
    pg = block_table.long()[:, slot // page].clamp(0, P - 1)  # (B, N)
    heads = torch.arange(Hkv, device=values.device)[None, :, None]
    flat = (pg[:, None, :] * Hkv + heads) * page + (slot % page)  # (B, Hkv, N)
    where = where.expand_as(flat)
    if values.is_cuda and torch.cuda.is_current_stream_capturing():
        flat, values = torch.where(where, flat, heads * page), torch.where(where, values, 0.0)
    else:
        flat, values = flat[where], values[where]
    cache.view(-1).scatter_(0, flat.reshape(-1), values.to(cache.dtype).reshape(-1))


def pool_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    stat: torch.Tensor,
    vsum: torch.Tensor,
    lse: torch.Tensor,
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
    args = (q, k_cache, v_cache, pos_cache, stat, vsum, lse, block_table, n_slots, evict_lo, evict_hi, mode)
    if _use_kernel(q):
        from .kernels.pool_attention import pool_attention_triton

        return pool_attention_triton(*args, scale)
    return pool_attention_torch(*args, scale)


def _use_kernel(q: torch.Tensor) -> bool:
    """The Triton kernel runs CUDA tensors when Triton imports and implements every registered policy."""
    if not q.is_cuda or not kernel_covers_registry():
        return False
    from .kernels import HAS_TRITON

    return HAS_TRITON


def pool_decode_torch(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, layer: LayerState,
                      rows: DecodeRows, scale: float) -> torch.Tensor:
    """Oracle of one layer's decode step. q: (B, H, D); k_new, v_new: (B, Hkv, D). Returns (B, H, D).

    1. the write slot: the next free slot, or the victim the previous pass chose (padding rows
       count as full with no victim: clamped onto their scratch slot 0);
    2. stage the slot's old K/V/position for the spill, take the old value out of S, write the
       new token's K/V/position/1/|V| and add it to S (rows that score attention: stat 0, and 1/|V| of the
       old value from the value);
    3. attend over the valid slots and choose the next victim (only where the row is full after
       the write; candidates are positions in [prefix, position + 1 - local]).
    """
    B, Hkv, D = k_new.shape
    P = layer.k.shape[2]
    full, n_slots = rows.after_write()
    slot = torch.where(full[:, None], layer.victim.clamp_min(0), rows.n_stored[:, None])  # (B, Hkv)
    page = rows.block_table.gather(1, (slot // P).long())  # (B, Hkv)
    heads = torch.arange(Hkv, device=q.device)
    # one flat index per (row, head) into the pool viewed as (P * Hkv * page, ...)
    flat = ((page.long() * Hkv + heads) * P + (slot % P)).view(-1)  # (B * Hkv,)
    # K/V move as bytes (raw): fp8 pools have no index kernels for every op
    kf, vf = raw(layer.k).view(-1, D), raw(layer.v).view(-1, D)
    pf, nf = layer.pos.view(-1), layer.stat.view(-1)
    raw(layer.spill_k).copy_(kf.index_select(0, flat).view(B, Hkv, D))
    raw(layer.spill_v).copy_(vf.index_select(0, flat).view(B, Hkv, D))
    layer.spill_pos.copy_(pf.index_select(0, flat).view(B, Hkv))
    old_inv = nf.index_select(0, flat).view(B, Hkv, 1)
    k_st, v_st = to_kv_storage(k_new, layer.k.dtype), to_kv_storage(v_new, layer.v.dtype)  # as stored
    v32 = v_st.float()  # S and 1/|V| from the stored value, so S loses exactly what it gained on eviction
    inv = v32.norm(dim=-1, keepdim=True).clamp_min(1e-6).reciprocal()  # (B, Hkv, 1)
    scoring = scores_attention(rows.mode).view(B, 1, 1)
    # S of every row, also where the slot holds a_i (then 1/|V| of the old value from the value itself)
    old_inv = torch.where(scoring, layer.spill_v.float().norm(dim=-1, keepdim=True).clamp_min(1e-6).reciprocal(),
                          old_inv)
    old = torch.where(full.view(B, 1, 1), layer.spill_v.float() * old_inv, 0.0)
    layer.vsum += v32 * inv - old
    kf.index_copy_(0, flat, raw(k_st).reshape(-1, D))
    vf.index_copy_(0, flat, raw(v_st).reshape(-1, D))
    pf.index_copy_(0, flat, rows.position.to(torch.int32).repeat_interleave(Hkv))
    nf.index_copy_(0, flat, torch.where(scoring, 0.0, inv).view(-1))
    hi = (rows.position + 1 - rows.local).to(torch.int32)
    out, victim = _attend(q, layer.k, layer.v, layer.pos, layer.stat, layer.vsum, layer.lse, rows.block_table,
                          n_slots, rows.prefix, hi, rows.mode, n_slots >= rows.budget, scale)  # victim once full
    layer.victim.copy_(victim)
    return out


def pool_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, layer: LayerState,
                rows: DecodeRows, scale: float) -> torch.Tensor:
    """One layer's decode step (see `pool_decode_torch`): one Triton launch on CUDA, else torch."""
    if _use_kernel(q):
        from .kernels.pool_attention import pool_decode_triton

        return pool_decode_triton(q, k_new, v_new, layer, rows, scale)
    return pool_decode_torch(q, k_new, v_new, layer, rows, scale)
