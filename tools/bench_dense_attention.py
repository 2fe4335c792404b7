"""One decode step's attention over a dense (rows, 20, 584, 64) bf16 cache, as the reference's compiled step runs
it, for each SDPA backend and a hand-written bf16 version (GPU). Prints one JSON line per (rows, variant): eager
and compiled ms per call (a compiled call alone pays its guards and launches, so at a few rows that, not the
kernel, is what it measures) and the max error against fp32. It chose the reference's attention
(docs/PERFORMANCE.md, run 19).

    PYTHONPATH=$PWD python3 tools/bench_dense_attention.py --rows 2,16,128,256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

S, H, D = 584, 20, 64  # GPT-XL 384: 577 positions rounded up to 8, as LlamaGen's cache


def manual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * D**-0.5
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).to(v.dtype)
    return p @ v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# name -> (function, the backend context it is traced and run in, allow_fp16_bf16_reduction_math_sdp)
VARIANTS: dict[str, tuple[Callable, Callable, bool]] = {
    "sdpa-default": (sdpa, contextlib.nullcontext, False),
    "sdpa-math": (sdpa, lambda: sdpa_kernel(SDPBackend.MATH), False),
    "sdpa-math-bf16-reduction": (sdpa, lambda: sdpa_kernel(SDPBackend.MATH), True),
    "sdpa-efficient": (sdpa, lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), False),
    "sdpa-cudnn": (sdpa, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION), False),
    "manual-bf16": (manual, contextlib.nullcontext, False),
}


def measure(fn: Callable, args: tuple, ref: torch.Tensor, ctx: Callable) -> dict:
    with ctx():
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        err = (compiled(*args).float() - ref).abs().max().item()
        return {"compiled_ms": round(do_bench(lambda: compiled(*args), rep=100), 4),
                "eager_ms": round(do_bench(lambda: fn(*args), rep=100), 4), "max_err": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="2,16,128,256", help="sequences (2 per CFG image)")
    p.add_argument("--copy-tbs", type=float, default=4.0, help="the floor's bandwidth, TB/s")
    a = p.parse_args()
    warnings.simplefilter("ignore")
    for rows in (int(r) for r in a.rows.split(",")):
        g = torch.Generator(device="cuda").manual_seed(rows)
        q, k, v = (torch.randn(rows, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for n in (1, S, S))
        mask = (torch.arange(S, device="cuda") <= 400).view(1, 1, 1, S).expand(rows, 1, 1, S).contiguous()
        ref = manual(q.float(), k.float(), v.float(), mask)
        floor_ms = 2 * k.numel() * k.element_size() / a.copy_tbs / 1e9
        for name, (fn, ctx, bf16_reduction) in VARIANTS.items():
            torch._dynamo.reset()
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(bf16_reduction)
            row: dict = {"rows": rows, "variant": name, "floor_ms": round(floor_ms, 4)}
            try:
                row |= measure(fn, (q, k, v, mask), ref, ctx)
            except Exception as e:  # noqa: BLE001 - a backend this card or build lacks: say so, go on
                row["error"] = repr(e)[:200]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
