"""Fused Triton sampling: CFG, temperature, top-k, top-p and the draw of `sample_tokens`, one launch.

One program per item (a request) holds its whole row of the vocabulary in registers:
  - guided logits (CFG of its conditional and unconditional rows), written out for log-probs;
  - top-k: the k-th largest value found by a radix select (32 counting passes over the bits of an
    order-preserving integer key), no sort;
  - top-p (rows with top_p < 1 only): the boundary value by the same bitwise search over the
    probability mass, ties at it split by index with one scan;
  - the draw: one scan of the kept probabilities in vocabulary order, the first index reaching u * total.
Same contract and tokens as `adsa_core.sampling.sample_tokens` (the oracle), which sorts instead. Sums
run in fp64 on both sides, so their order does not decide tokens; exp differs by an ulp or so from
torch's, so a draw within that of a token boundary may (GPU test: the agreement rate). Every
program reads only its own rows: a token never depends on batch neighbours. The decode step's entry,
`sample_and_feed_triton`, also does the item's bookkeeping around the draw (its uniform, CFG interval,
forced token, codes write, fed position, j) in the same launch.
Import only when adsa_core.kv.kernels.HAS_TRITON is true.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .kv.kernels.pdl import launch_options, pdl_enter

if TYPE_CHECKING:
    from .engine.sampler import StepBatch

MAX_VOCAB = 65536  # one row in one program's registers


@triton.jit
def _radix_search(key, weight, ok, goal, MASS: tl.constexpr):
    """The largest 32-bit key threshold t with sum(weight[key >= t]) >= goal (MASS: > goal); keys are
    int32 in signed order, searched bit by bit from the top in the offset (unsigned) domain."""
    found = tl.zeros([], dtype=tl.int64)
    for bit in tl.static_range(31, -1, -1):
        cand = found | (1 << bit)
        t = (cand - 2147483648).to(tl.int32)
        s = tl.sum(tl.where(ok & (key >= t), weight, 0), axis=0)
        hit = (s > goal) if MASS else (s >= goal)
        found = tl.where(hit, cand, found)
    return (found - 2147483648).to(tl.int32)


@triton.jit
def _mix32(x):
    """adsa_core.sampling._mix32: the low 32 bits (as uint32 and back), xorshift-multiply."""
    x = x.to(tl.uint32).to(tl.int64)
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D).to(tl.uint32).to(tl.int64)
    x = x ^ (x >> 15)
    x = (x * 0x6A09E667).to(tl.uint32).to(tl.int64)
    return x ^ (x >> 16)


@triton.jit
def _uniform(seed, j):
    """adsa_core.sampling.uniform_from for one (seed, position), bit for bit (int64 in, fp32 out)."""
    h = _mix32(seed)
    h = _mix32(h ^ (seed >> 32) ^ 0x5BD1E995)
    h = _mix32(h ^ (j * 0x2545F491))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _sample_kernel(
    logits_ptr, cond_ptr, uncond_ptr, active_ptr, scale_ptr, temp_ptr, topk_ptr, topp_ptr, greedy_ptr, u_ptr,
    guided_ptr, tok_ptr, stride_l, stride_g, V,
    seed_ptr, j_ptr, interval_ptr, fflag_ptr, slot_ptr, codes_ptr, forced_ptr, pos_ptr, stride_c, L, pos_offset,
    BLOCK_V: tl.constexpr, FEED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """FEED: the item's whole step of engine.sampler.sample_and_feed in this launch, not ~50 one-microsecond
    int64 torch kernels around it (run 22): CFG activity and the uniform from the item's (seed, j) (u_ptr
    receives it), the forced token, the codes write, the position its rows are fed (pos_ptr) and j += 1.
    Without FEED the caller passes activity and uniforms and gets tokens only (the oracle tests' entry)."""
    pdl_enter(PDL)
    i = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    ok = offs < V
    if FEED:
        j = tl.load(j_ptr + i)
        interval = tl.load(interval_ptr + i)
        is_active = (tl.load(scale_ptr + i) > 1.0) & ((interval < 0) | (j <= interval + 1))
        u_i = _uniform(tl.load(seed_ptr + i), j)
        tl.store(u_ptr + i, u_i)
    else:
        is_active = tl.load(active_ptr + i) != 0
        u_i = tl.load(u_ptr + i)
    g = tl.load(logits_ptr + tl.load(cond_ptr + i).to(tl.int64) * stride_l + offs, mask=ok, other=0.0)
    if is_active:  # uncond + (cond - uncond) * scale, unfused as in torch
        un = tl.load(logits_ptr + tl.load(uncond_ptr + i).to(tl.int64) * stride_l + offs, mask=ok, other=0.0)
        g = un + (g - un) * tl.load(scale_ptr + i)
    tl.store(guided_ptr + i * stride_g + offs, g, mask=ok)
    x = tl.where(ok, tl.math.div_rn(g, tl.maximum(tl.load(temp_ptr + i), 1e-5)), float("-inf"))
    top = tl.max(x, axis=0)
    if tl.load(greedy_ptr + i) != 0:
        tok = tl.min(tl.where(x == top, offs, BLOCK_V), axis=0)  # the lowest index of the largest
    else:
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed integer order == float order
        keep = ok
        k = tl.load(topk_ptr + i)
        if (k > 0) & (k < V):
            keep = ok & (key >= _radix_search(key, 1, ok, k, False))
        p = tl.where(keep, tl.exp(x - top), 0.0).to(tl.float64)  # sums in fp64, as the oracle
        top_p = tl.load(topp_ptr + i)
        if top_p < 1.0:  # keep a token while the mass before it (value order, ties by index) <= top_p
            limit = top_p * tl.sum(p, axis=0)
            edge = _radix_search(key, p, ok, limit, True)  # the value whose tokens cross the limit
            tie = tl.where(key == edge, p, 0.0)
            before = tl.sum(tl.where(key > edge, p, 0.0), axis=0) + tl.cumsum(tie, axis=0) - tie
            p = tl.where((key > edge) | ((key == edge) & (before <= limit)), p, 0.0)
        cdf = tl.cumsum(p, axis=0)
        total = tl.sum(tl.where(offs == V - 1, cdf, 0.0), axis=0)
        target = tl.maximum(u_i.to(tl.float64) * total, 2.2250738585072014e-308)  # fp64 tiny
        tok = tl.min(tl.where(ok & (cdf >= target), offs, V - 1), axis=0)
    tok = tok.to(tl.int64)
    if FEED:
        jc = tl.minimum(j, L - 1)  # an index: padding items count on past the end
        at = tl.load(slot_ptr + i) * stride_c + jc
        if tl.load(fflag_ptr + i) != 0:
            tok = tl.load(forced_ptr + at)
        tl.store(codes_ptr + at, tok)
        tl.store(pos_ptr + i, jc + pos_offset)
        tl.store(j_ptr + i, j + 1)
    tl.store(tok_ptr + i, tok)


def sample_guided_triton(logits: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, active: torch.Tensor,
                         cfg_scale: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                         top_p: torch.Tensor, greedy: torch.Tensor, u: torch.Tensor,
                         guided: torch.Tensor) -> torch.Tensor:
    """logits (R, V) fp32; per item (W,): rows cond/uncond, CFG active, settings, uniforms u. Fills
    guided (W, V) and returns tokens (W,) int64: `sample_tokens(guided, ...)` with u's seeds/positions."""
    W = cond.shape[0]
    launch = _launch_options(logits, guided)
    tok = torch.empty(W, dtype=torch.long, device=logits.device)
    if W == 0:
        return tok
    _sample_kernel[(W,)](
        logits, cond, uncond, active.to(torch.int32), cfg_scale.float(), temperature.float(), top_k, top_p.float(),
        greedy.to(torch.int32), u.float(), guided, tok, logits.stride(0), guided.stride(0), logits.shape[1],
        *(tok,) * 8, 0, 1, 0,  # FEED's pointers and sizes: never read
        FEED=False, **launch,
    )  # fmt: skip
    return tok


def _launch_options(logits: torch.Tensor, guided: torch.Tensor) -> dict:
    """Checks both entries' logits and guided rows; the launch options for their vocabulary size."""
    V = logits.shape[1]
    if logits.dtype != torch.float32 or logits.stride(1) != 1 or guided.stride(1) != 1 or V > MAX_VOCAB:
        raise ValueError(f"logits must be fp32 rows of at most {MAX_VOCAB} with a unit last stride")
    BLOCK_V = max(triton.next_power_of_2(V), 128)
    return dict(BLOCK_V=BLOCK_V, num_warps=min(16, max(4, BLOCK_V // 1024)), enable_fp_fusion=False,
                **launch_options(logits.device, logits.shape[0]))


def sample_and_feed_triton(logits: torch.Tensor, b: StepBatch, codes: torch.Tensor, forced: torch.Tensor,
                           pos_offset: int, guided: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """engine.sampler.sample_and_feed's item work in one launch, W = len(b.cond) items: fills guided (W, V),
    writes codes[slot, j] (the forced token where forced), advances b.j in place; returns the tokens, the
    positions to feed (W,) int64 and the uniforms drawn (W,) fp32, uniform_from(b.seed, b.j) bit for bit (the
    engine ignores them; the tests check the kernel's hash with them)."""
    W = b.cond.shape[0]
    launch = _launch_options(logits, guided)
    if codes.shape != forced.shape or codes.stride() != forced.stride() or codes.stride(1) != 1:
        raise ValueError("codes and forced must be (slots, L) alike, with a unit last stride")  # one index for both
    tok = torch.empty(W, dtype=torch.long, device=logits.device)
    pos = torch.empty(W, dtype=torch.long, device=logits.device)
    u = torch.empty(W, dtype=torch.float32, device=logits.device)
    if W == 0:
        return tok, pos, u
    _sample_kernel[(W,)](  # b.greedy also stands in for active_ptr, which FEED never reads (it computes activity)
        logits, b.cond, b.uncond, b.greedy, b.cfg_scale, b.temperature, b.top_k, b.top_p, b.greedy, u, guided, tok,
        logits.stride(0), guided.stride(0), logits.shape[1],
        b.seed, b.j, b.cfg_interval, b.forced, b.slot, codes, forced, pos, codes.stride(0), codes.shape[1], pos_offset,
        FEED=True, **launch,
    )  # fmt: skip
    return tok, pos, u
