"""Matmuls of a few rows (decode at batch 1-8 with CFG: 2-16 rows) as a Triton kernel that reads each
weight once, faster than cuBLAS where cuBLAS is slowest: the products with few output channels.

Why: at 2-16 rows cuBLAS reads GPT-XL's wo (1280 x 1280) at ~0.66 TB/s and w2 (1280 x 3584) at ~1.1 TB/s
(4.7-8 µs a call, a split-K kernel plus its `splitKreduce`). Here each program owns a BLOCK_N-wide stripe of
output channels and one of SPLIT slices of K, and writes its fp32 partial sums: 3.2 and 5.2 µs for those two
(run 27). The caller adds the slices (`linear`) in pointwise ops that Inductor fuses into the kernel consuming
the product (the residual add and RMSNorm), so split-K costs no launch, only ~1.2 µs more in that kernel.

The fused w1/w3 (7168 x 1280) runs here too: cuBLAS reads it at ~2.5 TB/s, so the kernel itself saves only
~0.3 µs, but its consumer, the SwiGLU, adds the slices in its own kernel, and under PDL (kv.kernels.pdl) a
kernel of ours keeps the step's chain of early launches unbroken where cuBLAS's does not: a lone request's step
1.46 -> 1.43 ms (run 31).

Run 27 also measured what did not pay: `sum(0)` over the slices is a second reduction that splits the
RMSNorm's kernel in two; summing in the kernel itself (the stripe's last slice to arrive adds the others)
costs ~2 µs a launch; and wqkv, whose consumers would need two extra kernels a layer (v, which goes straight
to the pool kernel, summed and cast; k copied into the pool's layout).

Import this module only where Triton is installed (adsa_core.kv.kernels.HAS_TRITON).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..kv.kernels.pdl import launch_options, pdl_enter

MAX_ROWS = 16  # the most rows this kernel takes; more go to cuBLAS, which is no longer latency-bound there


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """One launch of the kernel for a weight of shape (N, K)."""

    block_n: int  # output channels per program
    block_k: int  # K elements per loop iteration
    split: int  # slices of K, each its own program: N / block_n * split programs in all
    num_warps: int
    num_stages: int  # software pipelining depth of the K loop (cp.async)


@triton.jit
def _skinny_kernel(
    x_ptr,  # (M, K), row stride stride_xm, unit column stride
    w_ptr,  # (N, K), row stride stride_wn, unit column stride
    out_ptr,  # (SPLIT, M, N) fp32, contiguous: one partial product per slice of K
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K; the last slice may run past K (masked). Static: the
    # loop's trip count is known to the pipeliner (one compile per weight shape, two for a model)
    BLOCK_M: tl.constexpr,  # rows, padded to a power of two of at least 16 (tl.dot's minimum)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL (kv.kernels.pdl)
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_s * K_PER_SPLIT
    if PDL:  # the first K tile's weights before the wait: no kernel of a step writes weights, so their read
        # overlaps the end of the kernel before (without PDL this peel costs ~0.02 ms a step at batch 1, run 29)
        rk = k_start + tl.arange(0, BLOCK_K)
        in_k = rk[None, :] < K
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & in_k, other=0.0)
        pdl_enter(PDL)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & in_k, other=0.0)
        acc = tl.dot(x, tl.trans(w))  # (BLOCK_M, BLOCK_N)
        k0 = BLOCK_K
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k0 = 0
    for k in range(k0, K_PER_SPLIT, BLOCK_K):
        rk = k_start + k + tl.arange(0, BLOCK_K)
        in_k = rk[None, :] < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & in_k, other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & in_k, other=0.0)
        acc += tl.dot(x, tl.trans(w))  # (BLOCK_M, BLOCK_N)
    out = out_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


# Launches measured best on one H200 at 2-16 rows (run 27, tools/bench_skinny_matmul.py), by weight shape (N, K):
# GPT-XL's wo, w2 and fused w1/w3
TUNED = {
    (1280, 1280): SkinnyConfig(32, 128, 10, 4, 4),
    (1280, 3584): SkinnyConfig(64, 128, 13, 4, 4),
    (7168, 1280): SkinnyConfig(64, 128, 5, 4, 2),
}


def default_config(N: int, K: int) -> SkinnyConfig:
    """The launch for an (N, K) weight: the tuned one, else ~256 programs (2 an SM) of 128-wide K tiles."""
    if (N, K) in TUNED:
        return TUNED[N, K]
    block_n = 32 if N <= 4096 else 64
    split = max(1, min(triton.cdiv(K, 128), round(256 / triton.cdiv(N, block_n))))
    return SkinnyConfig(block_n, 128, split, num_warps=4, num_stages=4)


def _slices(K: int, cfg: SkinnyConfig) -> tuple[int, int]:
    """(K elements per slice, slices that hold any of K) for a launch."""
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.split), cfg.block_k) * cfg.block_k
    return k_per_split, triton.cdiv(K, k_per_split)


def partials(x: torch.Tensor, weight: torch.Tensor, cfg: SkinnyConfig | None = None) -> torch.Tensor:
    """x (M, K) with M <= MAX_ROWS, weight (N, K) -> fp32 partial products (slices, M, N) over slices of K;
    their sum is x @ weight.T."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS or weight.shape[1] != K or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"skinny matmul takes (M <= {MAX_ROWS}, K) by (N, K), unit column strides: "
                         f"{tuple(x.shape)} by {tuple(weight.shape)}")
    cfg = cfg or default_config(N, K)
    k_per_split, split = _slices(K, cfg)
    out = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    _skinny_kernel[(triton.cdiv(N, cfg.block_n), split)](
        x, weight, out, M, N, K, x.stride(0), weight.stride(0), K_PER_SPLIT=k_per_split,
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device, M))
    return out


@torch.library.custom_op("adsa::skinny_partials", mutates_args=())
def _partials_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`partials` at the default launch as a torch custom op: torch.compile keeps it whole in a graph."""
    return partials(x, weight)


@_partials_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    N, K = weight.shape
    return x.new_empty((_slices(K, default_config(N, K))[1], x.shape[0], N), dtype=torch.float32)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T through the kernel, in x's dtype. The caller checks `takes`."""
    p = _partials_op(x.reshape(-1, x.shape[-1]), weight)
    # the slices added one by one, not p.sum(0): pointwise adds fuse into the consumer's kernel even when
    # that kernel is a reduction over N (the RMSNorm after wo and w2), where a second reduction would not
    total = p[0]
    for i in range(1, p.shape[0]):
        total = total + p[i]
    return total.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` serves this product: a CUDA tensor of at most MAX_ROWS rows, 16-bit, same dtype."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.numel() <= MAX_ROWS * x.shape[-1] and weight.stride(-1) == 1)
