"""Fused Triton kernel: decode attention over the paged KV pool + next ADSA victim, one pass.

One program per (kv head, row). It walks the row's valid slots in blocks of BLOCK_N,
gathering each slot's page through the block table, and for every block:
  - online softmax over the G = H // Hkv query heads of this kv head (K/V read once for all G),
  - redundancy v̂_i·S = stat_i * (V_i·S) of the same V block (adsa), or the attention score
    a_i <- LINE_DECAY a_i + p_i (line, written back), folded into a running (best key, lowest slot)
    pair for the eviction candidates.
Every K/V byte of a valid slot is read exactly once; nothing past n_slots is touched. The
grid depends only on (B, Hkv) and there is no host sync, so the launch can be captured in a
CUDA graph. Contract and oracle: adsa_core.kv.attention.pool_attention_torch.

The kernel implements the victim rules of the policies marked `in_kernel` in adsa_core.kv.policy
(dense, adsa, window, line); their modes come from there as compile-time constants. A row of any other
mode gets no eviction candidate, and adsa_core.kv.attention never sends one here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..decode_state import DecodeRows, LayerState
from ..policy import ADSA, DENSE, LINE, LINE_DECAY, WINDOW
from .pdl import launch_options, pdl_enter, prefetch_l2


@triton.jit
def _pool_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_ptr, vsum_ptr, lse_ptr, bt_ptr, n_ptr, lo_ptr, hi_ptr, mode_ptr,
    out_ptr, victim_ptr,
    # WRITE only: the new token's K/V, budget and position per row, spill staging outputs
    knew_ptr, vnew_ptr, budget_ptr, position_ptr, spk_ptr, spv_ptr, spp_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in exp2
    n_pages,  # block table columns (MAX_PAGES: the next power of two)
    stride_qb, stride_qh, stride_sb, stride_sh, stride_lb, stride_bt, stride_ob, stride_oh, stride_xb,
    stride_kb, stride_kh, stride_vb, stride_vh,
    HKV: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MAX_PAGES: tl.constexpr, WRITE: tl.constexpr, FP8: tl.constexpr, LAZY_RESCALE: tl.constexpr,
    MODE_NONE: tl.constexpr, MODE_ADSA: tl.constexpr, MODE_WINDOW: tl.constexpr,  # from kv.policy
    MODE_LINE: tl.constexpr, DECAY: tl.constexpr, PDL: tl.constexpr,
    EARLY: tl.constexpr,  # PDL with WRITE: the row's state read, and its K/V prefetched into L2, before the wait
    AHEAD: tl.constexpr,  # the loop prefetches block i + AHEAD into L2 while it works on block i (0: no prefetch)
):  # fmt: skip
    # The pool tensors are contiguous (P, HKV, PAGE, D) / (P, HKV, PAGE): compile-time strides
    # let the compiler prove each slot row's alignment and issue wide loads (also for D = 100).
    # Without WRITE, n/lo/hi are n_slots, evict_lo, evict_hi, and every row picks a victim. With
    # WRITE they are the row state before this step (n_stored, prefix, local), and a row picks a victim
    # only once full. mode is the row's policy either way: a line row scores attention from its first step.
    # EARLY: under PDL every kernel two or more before this one has finished when it starts; only q, k_new and
    # v_new come from the one just before (the RoPE after the QKV projection). So everything else (the row's
    # state, the old slot, the victim) is read before the wait, and the row's K/V is on its way into L2.
    if not EARLY:
        pdl_enter(PDL)
    hk = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D  # D = 100 is padded to 128
    vsum_row = vsum_ptr + b * stride_sb + hk * stride_sh + offs_d
    svec = tl.load(vsum_row, mask=d_ok, other=0.0)
    lo = tl.load(lo_ptr + b)
    mode = tl.load(mode_ptr + b)
    scoring = mode == MODE_LINE  # the slot statistic is the attention score a_i, not 1/|V|
    if WRITE:  # the new token goes into the next free slot or over the victim the last pass chose
        n_old = tl.load(n_ptr + b)
        budget = tl.load(budget_ptr + b)
        position = tl.load(position_ptr + b)
        full = n_old >= budget
        # the row's whole block table, loaded beside the victim rather than after it: the write slot's page
        # is then a masked reduction in the program (through shared memory with 2 warps), not a dependent
        # global load before the old K/V can be read
        offs_p = tl.arange(0, MAX_PAGES)
        bt_all = tl.load(bt_ptr + b * stride_bt + offs_p, mask=offs_p < n_pages, other=0)
        wslot = tl.where(full, tl.maximum(tl.load(victim_ptr + b * stride_xb + hk), 0), n_old)
        wpage = tl.sum(tl.where(offs_p == wslot // PAGE, bt_all, 0), axis=0).to(tl.int64)
        wmeta = wpage * (HKV * PAGE) + hk * PAGE + wslot % PAGE
        wkv = wmeta * D + offs_d
        old_k = tl.load(k_ptr + wkv, mask=d_ok, other=0.0)
        old_v = tl.load(v_ptr + wkv, mask=d_ok, other=0.0)
        old_inv = tl.load(inv_ptr + wmeta)
        old_pos = tl.load(pos_ptr + wmeta)
        local = tl.load(hi_ptr + b)
        n = tl.minimum(n_old + 1, budget)  # valid slots after this write
        if EARLY:
            _prefetch_row(k_ptr, v_ptr, pos_ptr, inv_ptr, bt_ptr + b * stride_bt, hk, n, HKV, PAGE, D, BLOCK_N)
            pdl_enter(PDL)
        spill = (b * HKV + hk) * D + offs_d
        tl.store(spk_ptr + spill, old_k, mask=d_ok)
        tl.store(spv_ptr + spill, old_v, mask=d_ok)
        tl.store(spp_ptr + b * HKV + hk, old_pos)
        k_new = tl.load(knew_ptr + b * stride_kb + hk * stride_kh + offs_d, mask=d_ok, other=0.0)
        v_new = tl.load(vnew_ptr + b * stride_vb + hk * stride_vh + offs_d, mask=d_ok, other=0.0)
        if FP8:  # saturate: e4m3fn has no infinity (kv.pool.to_kv_storage)
            k_new = tl.minimum(tl.maximum(k_new.to(tl.float32), -448.0), 448.0)
            v_new = tl.minimum(tl.maximum(v_new.to(tl.float32), -448.0), 448.0)
        k_new = k_new.to(k_ptr.dtype.element_ty)  # as stored
        v_new = v_new.to(v_ptr.dtype.element_ty)
        v_new32 = v_new.to(tl.float32)  # S and 1/|V| from the stored value: eviction removes exactly it
        inv_new = 1.0 / tl.maximum(tl.sqrt(tl.sum(v_new32 * v_new32, axis=0)), 1e-6)
        if scoring:  # the slot holds a_i, not 1/|V|: the old value's norm from the value itself
            old_v32 = old_v.to(tl.float32)
            old_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(old_v32 * old_v32, axis=0)), 1e-6)
        svec += v_new32 * inv_new - tl.where(full, old_v.to(tl.float32) * old_inv, 0.0)
        tl.store(vsum_row, svec, mask=d_ok)
        tl.debug_barrier()  # every old byte is read before any thread overwrites it
        tl.store(k_ptr + wkv, k_new, mask=d_ok)
        tl.store(v_ptr + wkv, v_new, mask=d_ok)
        tl.store(pos_ptr + wmeta, position.to(tl.int32))
        tl.store(inv_ptr + wmeta, tl.where(scoring, 0.0, inv_new))
        tl.debug_barrier()  # the attention below reads the new slot: make the stores visible
        hi = (position + 1 - local).to(tl.int32)
        pick = n >= budget  # a victim only where full after this write
    else:
        n = tl.load(n_ptr + b)
        hi = tl.load(hi_ptr + b)
        pick = n >= 0
    evicting = pick & ((mode == MODE_ADSA) | (mode == MODE_WINDOW) | scoring)
    lse_row = lse_ptr + b * stride_lb + hk * G
    q_row = q_ptr + b * stride_qb + hk * G * stride_qh
    if G == 1:  # MHA: one query row is too small for a matrix unit, so scores are multiply-adds
        q = tl.load(q_row + offs_d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale  # (D_PAD,)
        lse_prev = tl.load(lse_row) * 1.4426950408889634  # the previous step's normaliser, in log2 units
        # Softmax state per lane (lane j sees slots j, j + BLOCK_N, ...), merged once after the
        # loop: a per-block max/sum over slots would cross warps, a barrier every block.
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    else:  # GQA: the G query heads of this kv head share each K/V block through small dots
        offs_g = tl.arange(0, G_PAD)
        g_ok = offs_g < G
        q = tl.load(
            q_row + offs_g[:, None] * stride_qh + offs_d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (G_PAD, D_PAD)
        if FP8:  # the dots run in bf16 (fp8 operands would need a scale)
            q = q.to(tl.bfloat16)
        else:
            q = q.to(k_ptr.dtype.element_ty)
        lse_prev = tl.load(lse_row + offs_g, mask=g_ok, other=float("inf")) * 1.4426950408889634  # (G_PAD,)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)  # victim search per lane as well
    best_slot = tl.full([BLOCK_N], -1, tl.int32)

    bt_row = bt_ptr + b * stride_bt
    kv_head = hk * PAGE * D
    page_next = tl.load(bt_row).to(tl.int64)  # page ids are int64: pools can pass 2**31 elements
    for start in range(0, n, BLOCK_N):
        if AHEAD > 0:  # a prefetch in flight holds no register: more bytes on their way than the loads can hold
            _prefetch_block(k_ptr, v_ptr, pos_ptr, inv_ptr, bt_row, hk, start + AHEAD * BLOCK_N, n, HKV, PAGE, D,
                            BLOCK_N)
        slot = start + tl.arange(0, BLOCK_N)
        s_ok = slot < n
        if PAGE % BLOCK_N == 0:  # the block lies in one page: one uniform id, fetched a block ahead so
            page = page_next  # that this block's K/V loads do not wait on a block-table load
            ahead = start + BLOCK_N
            page_next = tl.load(bt_row + ahead // PAGE, mask=ahead < n, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + slot // PAGE, mask=s_ok, other=0).to(tl.int64)
        meta = page * (HKV * PAGE) + hk * PAGE + slot % PAGE  # (BLOCK_N,) index into pos / stat
        kv = (page * (HKV * PAGE * D) + kv_head + (slot % PAGE) * D)[:, None] + offs_d[None, :]
        kv_ok = s_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv, mask=kv_ok, other=0.0)  # (BLOCK_N, D_PAD)
        v = tl.load(v_ptr + kv, mask=kv_ok, other=0.0)  # (BLOCK_N, D_PAD)
        pos = tl.load(pos_ptr + meta, mask=s_ok, other=0)
        inv = tl.load(inv_ptr + meta, mask=s_ok, other=0.0)
        vf = v.to(tl.float32)

        # --- attention: online softmax over the block
        if G == 1:
            qk = tl.sum(q[None, :] * k.to(tl.float32), axis=1)  # (BLOCK_N,): a reduction within a warp
            qk = tl.where(s_ok, qk, float("-inf"))
            if LAZY_RESCALE:
                # a lane's reference maximum moves only once a score passes it by more than RESCALE_SLACK (log2
                # units): until then p <= 2**RESCALE_SLACK and the accumulator needs no rescale, which most
                # blocks skip once the first ones have set the maxima (FlashAttention-4's conditional rescaling)
                if tl.max((qk > m_i + RESCALE_SLACK).to(tl.int32), axis=0) > 0:
                    m_up = tl.maximum(m_i, qk)
                    alpha = tl.exp2(m_i - tl.where(m_up == float("-inf"), 0.0, m_up))
                    l_i = l_i * alpha
                    acc = acc * alpha[:, None]
                    m_i = m_up
                p = tl.exp2(qk - tl.where(m_i == float("-inf"), 0.0, m_i))  # a lane with no slot: no inf - inf
                l_i = l_i + p
                acc = acc + p[:, None] * vf  # (BLOCK_N, D_PAD)
            else:
                m_new = tl.maximum(m_i, qk)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no slot yet: no inf - inf
                alpha = tl.exp2(m_i - m_ref)
                p = tl.exp2(qk - m_ref)
                l_i = l_i * alpha + p
                acc = acc * alpha[:, None] + p[:, None] * vf  # (BLOCK_N, D_PAD)
                m_i = m_new
        else:
            if FP8:
                k = k.to(tl.bfloat16)
                v = v.to(tl.bfloat16)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (G_PAD, BLOCK_N)
            qk = tl.where(s_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # --- next victim: largest v̂·S (adsa), smallest position (window), least attention (line)
        if scoring:  # a_i <- DECAY a_i + p_i with the previous step's normaliser, back into the pool
            if G == 1:
                # (BLOCK_N,), at most 1 (a probability); 0 for masked slots and on a row's first step
                p_att = tl.exp2(tl.minimum(qk - lse_prev, 0.0))
            else:
                p_att = tl.sum(tl.exp2(tl.minimum(qk - lse_prev[:, None], 0.0)), axis=0)  # over the query heads
            inv = DECAY * inv + p_att
            tl.store(inv_ptr + meta, inv, mask=s_ok)
            key = -inv
        else:
            red = inv * tl.sum(vf * svec[None, :], axis=1)  # (BLOCK_N,)
            key = tl.where(mode == MODE_ADSA, red, -pos.to(tl.float32))  # else MODE_WINDOW
        cand = s_ok & (pos >= lo) & (pos <= hi) & evicting
        key = tl.where(cand, key, float("-inf"))
        take = key > best  # strict: a lane keeps its earlier (lower) slot on ties
        best = tl.where(take, key, best)
        best_slot = tl.where(take, slot, best_slot)

    # lanes -> row: the largest key, and among lanes holding it the lowest slot
    top = tl.max(best, axis=0)
    victim = tl.min(tl.where(best == top, best_slot, 2147483647), axis=0)
    tl.store(victim_ptr + b * stride_xb + hk, tl.where(top == float("-inf"), -1, victim))
    o_row = out_ptr + b * stride_ob + hk * G * stride_oh
    if G == 1:
        m = tl.max(m_i, axis=0)
        w = tl.exp2(m_i - tl.where(m == float("-inf"), 0.0, m))  # (BLOCK_N,) lane weights
        l_row = tl.sum(l_i * w, axis=0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.maximum(l_row, 1e-30)  # n = 0: 0, not NaN
        tl.store(o_row + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
        # this step's log-sum-exp, natural units (+inf: no slot, so the next step adds no score)
        tl.store(lse_row, tl.where(l_row > 0, (m + tl.log2(l_row)) * 0.6931471805599453, float("inf")))
    else:
        lse_now = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * 0.6931471805599453, float("inf"))
        tl.store(lse_row + offs_g, lse_now, mask=g_ok)
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        o_ptrs = o_row + offs_g[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _prefetch_row(k_ptr, v_ptr, pos_ptr, inv_ptr, bt_row, hk, n, HKV: tl.constexpr, PAGE: tl.constexpr,
                  D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Every block of the row's slots [0, n) into L2 (`_prefetch_block`)."""
    for start in range(0, n, BLOCK_N):
        _prefetch_block(k_ptr, v_ptr, pos_ptr, inv_ptr, bt_row, hk, start, n, HKV, PAGE, D, BLOCK_N)


@triton.jit
def _prefetch_block(k_ptr, v_ptr, pos_ptr, inv_ptr, bt_row, hk, start, n, HKV: tl.constexpr, PAGE: tl.constexpr,
                    D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The K/V, positions and statistics of slots [start, start + BLOCK_N) into L2; nothing when start >= n. Lanes
    past n fetch from their block's page or the scratch page (id 0): valid memory, read by no one."""
    if start < n:
        slot = start + tl.arange(0, BLOCK_N)
        if PAGE % BLOCK_N == 0:  # one page: a uniform id, so the block's offsets are its first slot's plus a range
            page = tl.load(bt_row + start // PAGE).to(tl.int64)
            meta = page * (HKV * PAGE) + (hk * PAGE + start % PAGE) + tl.arange(0, BLOCK_N)
        else:
            page = tl.load(bt_row + slot // PAGE, mask=slot < n, other=0).to(tl.int64)
            meta = page * (HKV * PAGE) + hk * PAGE + slot % PAGE
        prefetch_l2(k_ptr + meta * D)  # a slot's K (and V) row starts at meta * D
        prefetch_l2(v_ptr + meta * D)
        prefetch_l2(pos_ptr + meta)
        prefetch_l2(inv_ptr + meta)


# How far (log2 units) a score may pass its lane's reference maximum before the accumulator is rescaled: p stays
# <= 2**8, far from fp32's range for the <= 2**15 slots a row holds
RESCALE_SLACK = tl.constexpr(8.0)

# The policies' modes and line's decay, as the kernel compiles them in (every launch, and offline compiles)
POLICY_CONSTANTS = dict(MODE_NONE=DENSE.mode, MODE_ADSA=ADSA.mode, MODE_WINDOW=WINDOW.mode, MODE_LINE=LINE.mode,
                        DECAY=LINE_DECAY)

# Grids up to this many programs (kv heads x rows: GPT-XL's batch 1 is 40, batch 8 is 320) are too few to fill
# an H200's 132 SMs with small programs: each walks its row in wider, fewer blocks instead.
FEW_PROGRAMS = 512
# On those grids, the widest block whose launch stays within this many warps in all (~5 an SM on an H200): fewer
# loop iterations where programs are few, 2-warp blocks where they are not (run 28, measured at GPT-XL's 40-320)
SMALL_GRID_WARPS = 640


def default_config(G: int, D: int, page: int, programs: int, fp8: bool = False) -> dict:
    """Launch parameters for a grid of `programs` (kv head, row) programs, measured on an H200
    (docs/PERFORMANCE.md: tools/bench_pool_attention.py for large grids, the engine's step for small ones).

    Small programs win on large grids: one warp per 16 slots keeps every reduction inside a warp, many programs
    per SM hide the memory latency, and with page % 16 == 0 each block reads a single page. On a small grid
    a program's loop latency is the step's, so it walks its row in wider blocks with more warps: 256 slots and 8
    warps at batches 1-2 (a row of adsa 1/4 at 384 px in one iteration), 128 and 4 at batch 4, 64 and 2 at
    batch 8 (run 28: a lone request's step 1.60 -> 1.55 ms; run 21: 64 x 2 against 16 x 1). Measured with fp8
    K/V at adsa 1/4; bf16 pools and longer rows (dense) take the same rule unmeasured.

    Large grids prefetch each program's next block into L2 while it works on the current one (`ahead`, run 31). A
    one-warp program holds one block's loads at a time, and 16 programs an SM (128 registers) keep too few bytes in
    flight to cover the memory latency; a prefetch holds no register. fp8 K/V at 1024 rows x 144 slots, with the
    write: 151 -> 138 µs (read-only 151 -> 126); in the engine at batch 512, 5.22 -> 4.84 ms a step. Two blocks
    ahead measured the same as one, and so did prefetching the first block before the write's reads. Only where
    the conditional rescale is on: offline, the bf16 launch's eager rescale would lose occupancy to the prefetch's
    registers (12 -> 8 programs an SM), and it is unmeasured.

    The conditional rescale pays where it buys occupancy (run 24): fp8 K/V with the write on a large grid goes
    from 163 to 128 registers, 12 -> 16 programs an SM, and 180.8 -> 154.6 us for 1024 rows. Where the programs
    an SM stay the same, its branch costs without paying back: bf16 (168 -> 137 registers, still 12; 236.7 ->
    279.3 us) and small grids (+25 % for the pool kernel at batch 1).
    """
    if G == 1 and D <= 64 and programs <= FEW_PROGRAMS:
        block_n, warps = next(((n, w) for n, w in ((256, 8), (128, 4)) if programs * w <= SMALL_GRID_WARPS), (64, 2))
        return {"block_n": block_n, "num_warps": warps, "num_stages": 2, "lazy_rescale": False, "ahead": 0}
    if G == 1:  # the conditional rescale where it was measured: fp8, 64-wide heads (D > 64: 2 warps, unmeasured)
        lazy = fp8 and D <= 64 and programs > FEW_PROGRAMS
        return {"block_n": 16, "num_warps": 1 if D <= 64 else 2, "num_stages": 2, "lazy_rescale": lazy,
                "ahead": int(lazy)}
    return {"block_n": 32, "num_warps": 4, "num_stages": 2, "lazy_rescale": False, "ahead": 0}  # GQA: untuned


def pool_attention_triton(
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
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    lazy_rescale: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as pool_attention_torch. Keyword overrides are for tuning and tests only."""
    B, H, D = q.shape
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    victim = torch.empty((B, k_cache.shape[1]), dtype=torch.int32, device=q.device)
    _launch(q, k_cache, v_cache, pos_cache, stat, vsum, lse, block_table, n_slots, evict_lo, evict_hi, mode,
            out, victim, None, scale, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
            lazy_rescale=lazy_rescale)
    return out, victim


def pool_decode_triton(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, layer: LayerState,
                       rows: DecodeRows, scale: float) -> torch.Tensor:
    """Same contract as adsa_core.kv.attention.pool_decode_torch, in one launch: each program
    (kv head, row) writes its row's new slot, then attends over the row."""
    B, H, D = q.shape
    Hkv = k_new.shape[1]
    if k_new.shape != (B, Hkv, D) or v_new.shape != k_new.shape or k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError(f"k_new and v_new must be ({B}, {Hkv}, {D}) with a unit last stride")
    for name in ("spill_k", "spill_v", "spill_pos", "victim"):
        if not getattr(layer, name).is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    write = (k_new, v_new, rows.budget, rows.position, layer.spill_k, layer.spill_v, layer.spill_pos)
    _launch(q, layer.k, layer.v, layer.pos, layer.stat, layer.vsum, layer.lse, rows.block_table, rows.n_stored,
            rows.prefix, rows.local, rows.mode, out, layer.victim, write, scale)
    return out


def _launch(q, k_cache, v_cache, pos_cache, stat, vsum, lse, block_table, n, lo, hi, mode, out, victim, write,
            scale, block_n=None, num_warps=None, num_stages=None, lazy_rescale=None) -> None:
    B, H, D = q.shape
    P, Hkv, page, Dk = k_cache.shape
    if Dk != D or H % Hkv or v_cache.shape != k_cache.shape:
        shapes = f"q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        raise ValueError(f"shapes disagree: {shapes}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("pos_cache", pos_cache),
                    ("stat", stat)):  # fmt: skip
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel compiles its strides in)")
    if pos_cache.shape != k_cache.shape[:3] or stat.shape != k_cache.shape[:3]:
        raise ValueError("pos_cache and stat must be (P, Hkv, page)")
    if q.stride(-1) != 1 or vsum.stride(-1) != 1 or lse.stride(-1) != 1:
        raise ValueError("q, vsum and lse must be contiguous in their last dim")
    if lse.shape != (B, H) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be ({B}, {H}) float32")
    # int32 index tensors per the pool layout; others are converted (a no-op when already int32)
    block_table, n, lo, hi, mode = (t.to(torch.int32).contiguous() for t in (block_table, n, lo, hi, mode))
    if block_table.shape[1] == 0:
        raise ValueError("block_table needs at least one column")
    if B == 0:
        return
    if write is None:  # the WRITE-only pointers are never read: any tensor will do
        k_new = v_new = budget = position = spill_k = spill_v = spill_pos = q
    else:
        k_new, v_new, budget, position, spill_k, spill_v, spill_pos = write
        budget = budget.to(torch.int32).contiguous()
    G = H // Hkv
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    cfg = default_config(G, D, page, Hkv * B, fp8)
    _pool_attention_kernel[(Hkv, B)](
        q, k_cache, v_cache, pos_cache, stat, vsum, lse, block_table, n, lo, hi, mode,
        out, victim,
        k_new, v_new, budget, position, spill_k, spill_v, spill_pos,
        scale * math.log2(math.e), block_table.shape[1],
        q.stride(0), q.stride(1), vsum.stride(0), vsum.stride(1), lse.stride(0), block_table.stride(0),
        out.stride(0), out.stride(1), victim.stride(0),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        HKV=Hkv, PAGE=page, D=D, D_PAD=max(16, triton.next_power_of_2(D)),
        G=G, G_PAD=1 if G == 1 else max(16, triton.next_power_of_2(G)), BLOCK_N=block_n or cfg["block_n"],
        MAX_PAGES=triton.next_power_of_2(block_table.shape[1]) if write is not None else 1,  # read-only: unused
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", WRITE=write is not None,
        FP8=fp8, LAZY_RESCALE=cfg["lazy_rescale"] if lazy_rescale is None else lazy_rescale, **POLICY_CONSTANTS,
        AHEAD=cfg["ahead"],
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
        **_pdl_options(q.device, B, write is not None),
    )  # fmt: skip


def _pdl_options(device: torch.device, B: int, write: bool) -> dict:
    """The launch's PDL switches: the fused write's launch reads early wherever it takes PDL (run 30: a lone
    request's step 0.02-0.04 ms shorter, batch 8 level). GPU tests cover that order; on the CPU PDL is off."""
    opts = launch_options(device, B)
    return {**opts, "EARLY": opts["PDL"] and write}
