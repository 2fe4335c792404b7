"""VQ-16 decode speed and peak memory per chunk size and execution variant (GPU).

The engine decodes finished images in chunks on its own stream; that work shares the GPU with
token decoding, so its cost per image counts directly against images/s.

    python tools/bench_vq_decode.py --image-size 384 --chunks 8,16 --out vq.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adsa_core.config import VQConfig
from adsa_core.model.checkpoint import load_vq


def measure(fn, codes: torch.Tensor, chunk: int, reps: int) -> tuple[float, int]:
    """ms per image and peak bytes above the baseline, decoding `codes` in chunks."""
    for c in codes[: 2 * chunk].split(chunk):  # warm-up (and compile) on the timed shape
        fn(c)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(reps):
        for c in codes.split(chunk):
            fn(c)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t0) / (reps * len(codes))
    return ms, torch.cuda.max_memory_allocated() - base


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--chunks", default="8,16")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--variants", default="eager,channels_last,cudnn_benchmark,compile")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = VQConfig()
    vq = load_vq(cfg, None, "cuda", torch.bfloat16)
    grid = a.image_size // cfg.downsample
    codes = torch.randint(0, cfg.codebook_size, (a.images, grid * grid), device="cuda")
    rows = []
    for variant in a.variants.split(","):
        torch.backends.cudnn.benchmark = variant == "cudnn_benchmark"
        if variant == "channels_last":
            vq.to(memory_format=torch.channels_last)
        fn = torch.compile(vq.decode_code, dynamic=False) if variant == "compile" else vq.decode_code
        for chunk in (int(c) for c in a.chunks.split(",")):
            with torch.no_grad():
                ms, peak = measure(fn, codes, chunk, a.reps)
            rows.append({"variant": variant, "chunk": chunk, "ms_per_image": round(ms, 3),
                         "peak_mib": round(peak / 2**20, 1), "card": torch.cuda.get_device_name()})
            print(json.dumps(rows[-1]), flush=True)
        if variant == "channels_last":
            vq.to(memory_format=torch.contiguous_format)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
