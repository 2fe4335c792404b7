"""Small-batch matmuls of a decode step: cuBLAS (`F.linear`) against a Triton kernel written for few rows (GPU).

At batch 1 the engine's step spends 0.88 ms in the blocks' matmuls against a 0.31 ms weight read
(docs/PERFORMANCE.md, run 19): with 2-16 rows each matmul is a weight stream, and cuBLAS's tile kernels
(plus a split-K reduce) reach about a third of the memory bandwidth. This tool measures whether a kernel
shaped for it does better before anything is wired into the engine: per GPT-XL block matmul (and the output
head) and per row count, cuBLAS's time and the best of a small sweep of the kernel below, each checked
against an fp32 product first, then the estimate per decode step (36 layers).

The kernel: y (M, N) = x (M, K) @ w (N, K)^T with M <= 16. Program (n-block, k-split) streams BLOCK_N weight
rows over its share of K in BLOCK_K chunks (each row's chunk is contiguous: coalesced) and multiplies them
with the few activation rows on the tensor cores (rows padded to 16, which costs nothing a weight stream
notices). With SPLIT_K > 1 the partial sums go to an fp32 buffer and a second launch adds them in a fixed
order: the result does not depend on timing.

    PYTHONPATH=$PWD python3 tools/bench_small_gemm.py --rows 2,4,8,16
    TRITON_INTERPRET=1 python3 tools/bench_small_gemm.py --device cpu --shapes 48x40 --rows 2 --check-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import triton
import triton.language as tl

# GPT-XL 384's matmuls per decode step: (name, N, K, launches per step)
GPT_XL = (("wqkv", 3840, 1280, 36), ("wo", 1280, 1280, 36), ("w13", 7168, 1280, 36), ("w2", 1280, 3584, 36),
          ("output", 16384, 1280, 1))
M_PAD = 16  # tl.dot's smallest tile: the activation rows are padded to it


@triton.jit
def _small_gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_ys, stride_ym,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_K): the weight stream
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # (M_PAD, BLOCK_K): a few rows, cached
        acc += tl.dot(x, tl.trans(w))
    y = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def small_gemm(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, split_k: int, num_warps: int,
               num_stages: int) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T for M <= 16, in x's dtype; the launch parameters are the sweep's."""
    M, K = x.shape
    N = w.shape[0]
    if M > M_PAD or w.shape[1] != K or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)}: need M <= {M_PAD} and unit last strides")
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    out = torch.empty((splits, M, N), device=x.device, dtype=x.dtype if splits == 1 else torch.float32)
    _small_gemm_kernel[(triton.cdiv(N, block_n), splits)](
        x, w, out, M, N, K, k_per_split, x.stride(0), w.stride(0), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, M_PAD=M_PAD, num_warps=num_warps, num_stages=num_stages)
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)  # the splits in a fixed order


def sweep(quick: bool) -> list[dict]:
    """Launch configurations, the plainest first."""
    grid = itertools.product((16, 32, 64), (128, 256), (1, 2, 4), (4,), (3, 4)) if not quick else \
        itertools.product((16, 32), (128,), (1, 2), (4,), (3,))
    return [dict(block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=st) for n, k, s, w, st in grid]


def bench_us(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return 1000 * do_bench(fn, warmup=10, rep=50, return_mode="median")  # L2 flushed between calls
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


def time_case(x: torch.Tensor, w: torch.Tensor, configs: list[dict], dev: torch.device
              ) -> tuple[float, tuple[float, dict]]:
    """cuBLAS's time, and the fastest configuration's (us, config)."""
    cublas = bench_us(lambda: torch.nn.functional.linear(x, w), dev)
    timed = [(bench_us(lambda c=cfg: small_gemm(x, w, **c), dev), cfg) for cfg in configs]
    return cublas, min(timed, key=lambda t: t[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="2,4,8,16", help="activation rows (2 per CFG image)")
    p.add_argument("--shapes", default="", help="NxK,... instead of GPT-XL's matmuls (each counted once per step)")
    p.add_argument("--quick", action="store_true", help="a few configurations only")
    p.add_argument("--check-only", action="store_true", help="correctness of every configuration, no timing")
    p.add_argument("--hbm-tbs", type=float, default=4.8, help="the weight read's floor bandwidth, TB/s")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = GPT_XL if not a.shapes else tuple(
        (s, int(s.split("x")[0]), int(s.split("x")[1]), 1) for s in a.shapes.split(","))
    configs = sweep(a.quick)
    g = torch.Generator(device=dev).manual_seed(0)
    step_us: dict[int, dict[str, float]] = {}
    for (name, N, K, per_step), M in itertools.product(shapes, (int(r) for r in a.rows.split(","))):
        w = torch.randn(N, K, device=dev, dtype=dtype, generator=g) / K**0.5
        x = torch.randn(M, K, device=dev, dtype=dtype, generator=g)
        ref = x.float() @ w.float().T
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # bf16 output rounding
        for cfg in configs:  # every configuration is correct before any is timed
            err = ((small_gemm(x, w, **cfg).float() - ref).abs().max() / ref.abs().max()).item()
            if err > tol:
                raise SystemExit(f"{name} M={M} {cfg}: relative error {err:.2e} > {tol}")
        if a.check_only:
            print(json.dumps({"shape": name, "N": N, "K": K, "rows": M, "configs_checked": len(configs)}), flush=True)
            continue
        cublas, (best_us, best_cfg) = time_case(x, w, configs, dev)
        floor_us = N * K * w.element_size() / a.hbm_tbs / 1e6
        row = {"shape": name, "N": N, "K": K, "rows": M, "floor_us": round(floor_us, 2), "cublas_us": round(cublas, 2),
               "triton_us": round(best_us, 2), "speedup": round(cublas / best_us, 2), "best": best_cfg,
               "triton_tbs": round(N * K * w.element_size() / best_us / 1e6, 2)}
        print(json.dumps(row), flush=True)
        per = step_us.setdefault(M, {"cublas": 0.0, "triton": 0.0, "floor": 0.0})
        for key, us in (("cublas", cublas), ("triton", best_us), ("floor", floor_us)):
            per[key] += per_step * us
    for M, per in step_us.items():  # what a decode step's matmuls would take, launches back to back
        print(json.dumps({"rows": M, "per_step_ms": {k: round(v / 1000, 3) for k, v in per.items()}}), flush=True)


if __name__ == "__main__":
    main()
