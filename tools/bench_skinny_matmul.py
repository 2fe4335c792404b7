"""The skinny matmul kernel (adsa_core/model/skinny_matmul.py) against cuBLAS (F.linear) on a model's weight
shapes, at the few rows of small-batch decode (run on the device machine).

As in the engine's step, each timing is a CUDA graph that runs one product per layer, every layer with its own
weight, so that no weight is read from L2 (GPT-XL's 36 layers of one shape are 120-660 MB; L2 is 50 MB). It
reports µs a call: the kernel's own time, without the sum over K slices, which the engine fuses into the next
kernel. The sweep runs at 2 rows (a lone CFG request); the best launches and the default are then timed at
every row count of --rows, beside cuBLAS. Each launch's result is checked against F.linear first.

    PYTHONUNBUFFERED=1 python3 tools/bench_skinny_matmul.py --preset GPT-XL --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm
from triton import cdiv
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from adsa_core.config import gpt_preset  # noqa: E402
from adsa_core.model.skinny_matmul import SkinnyConfig, default_config, partials  # noqa: E402


def graph_us(calls: list[Callable[[], object]]) -> float:
    """Median µs a call of `calls`, run back to back inside a CUDA graph."""
    return do_bench_cudagraph(lambda: [c() for c in calls], return_mode="median") * 1000 / len(calls)


def sweep_configs(N: int, K: int) -> list[SkinnyConfig]:
    """The default launch and, for each stripe width, K tile, warps and stages, splits for ~1, 2 and 4 programs
    an SM."""
    out = {default_config(N, K)}
    for block_n, block_k, warps, stages in itertools.product((16, 32, 64), (128, 256), (4, 8), (2, 4)):
        stripes = cdiv(N, block_n)
        for programs in (132, 264, 528):
            split = max(1, min(cdiv(K, block_k), round(programs / stripes)))
            out.add(SkinnyConfig(block_n, block_k, split, warps, stages))
    return sorted(out, key=dataclasses.astuple)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="GPT-XL")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--rows", default="2,4,8,16", help="row counts for the best launches against cuBLAS")
    ap.add_argument("--top", type=int, default=3, help="launches per shape carried from the sweep")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = gpt_preset(args.preset, args.image_size)
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    shapes = {"wqkv": (qkv, cfg.dim), "wo": (cfg.dim, cfg.dim), "w13": (2 * cfg.ffn_hidden_dim, cfg.dim),
              "w2": (cfg.dim, cfg.ffn_hidden_dim), "output": (cfg.vocab_size, cfg.dim)}
    layers = cfg.n_layer
    print(torch.cuda.get_device_name(), torch.__version__, f"{args.preset}: {layers} layers, shapes {shapes}")
    results: dict[str, object] = {}
    for name, (N, K) in shapes.items():
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(layers)]
        x2 = torch.randn(2, K, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x2, weights[0]).float()
        cublas = graph_us([partial(F.linear, x2, w) for w in weights])
        ranked = []
        for c in tqdm(sweep_configs(N, K), desc=name, leave=False):
            got = partials(x2, weights[0], c).sum(0)
            if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                raise SystemExit(f"{name} {c}: wrong result, max error {(got - want).abs().max().item():.3g}")
            ranked.append((graph_us([partial(partials, x2, w, c) for w in weights]), c))
        ranked.sort(key=lambda t: t[0])
        default = default_config(N, K)
        carried = list(dict.fromkeys([c for _, c in ranked[: args.top]] + [default]))
        by_rows = {}
        for M in (int(r) for r in args.rows.split(",")):
            xm = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = {"cublas": graph_us([partial(F.linear, xm, w) for w in weights])}
            for c in carried:
                row[str(dataclasses.astuple(c))] = graph_us([partial(partials, xm, w, c) for w in weights])
            by_rows[M] = row
        mb = N * K * 2 / 1e6
        times = {c: t for t, c in ranked}
        print(f"{name} ({N}x{K}, {mb:.1f} MB), 2 rows: cuBLAS {cublas:.2f} us ({mb * 1e3 / cublas:.0f} GB/s); "
              f"default {dataclasses.astuple(default)} {times[default]:.2f} us")
        for t, c in ranked[:6]:  # (block_n, block_k, split, warps, stages)
            print(f"  {dataclasses.astuple(c)}: {t:.2f} us, {mb * 1e3 / t:.0f} GB/s")
        for M, row in by_rows.items():
            print(f"  rows {M}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
        results[name] = {"shape": [N, K], "cublas_2_rows_us": cublas,
                         "sweep": [[dataclasses.astuple(c), t] for t, c in ranked], "by_rows": by_rows}
        del weights
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "skinny_matmul.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
