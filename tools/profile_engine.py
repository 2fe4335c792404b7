"""Profile engine decode steps on the GPU: where the time of one step goes (kernels and host).

    python tools/profile_engine.py --preset GPT-XL --image-size 384 --batch 64 --policy adsa --budget 0.25
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from adsa_core.config import CacheConfig, EngineConfig, VQConfig, gpt_preset
from adsa_core.engine import Engine, GenerationRequest
from adsa_core.eval.bench import random_models
from adsa_core.sampling import SamplingParams

# kernel name fragments -> the part of a step they belong to (first match wins)
PARTS = (
    ("pool attention", ("pool_",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "splitkreduce")),
    ("sampling", ("topk", "sort", "scan", "radix", "searchsorted", "sample", "gather", "index", "cumsum")),
    ("fused elementwise (Inductor)", ("triton_",)),
)


def print_by_part(prof: profile, steps: int) -> None:
    """GPU time per step by part of the step, from the profiler's kernel events."""
    by_part: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if ev.device_type.name != "CUDA" or not us:  # kernels only, not the CPU-side ops that launched them
            continue
        name = ev.key.lower()
        part = next((p for p, keys in PARTS if any(k in name for k in keys)), "other")
        by_part[part] = by_part.get(part, 0.0) + us
    total = sum(by_part.values())
    print(f"GPU time per step by part (of {total / steps / 1000:.2f} ms):")
    for part, us in sorted(by_part.items(), key=lambda kv: -kv[1]):
        print(f"  {part:32s} {us / steps / 1000:6.3f} ms  {100 * us / total:5.1f} %")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="GPT-XL")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--policy", default="dense")
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    a = p.parse_args()
    dev = torch.device("cuda")
    cfg = gpt_preset(a.preset, a.image_size)
    models = random_models(cfg, VQConfig(), a.preset, a.image_size, dev, torch.bfloat16)
    eng = Engine(models, EngineConfig(max_batch_size=a.batch, max_queue=max(256, a.batch),
                                      cuda_graphs=not a.no_graphs,
                                      compile_step=a.compile, kv_cache_dtype=a.kv_cache_dtype,
                                      default_cache=CacheConfig(policy=a.policy, budget=a.budget)))
    sp = SamplingParams(cfg_scale=4.0, top_k=2000)
    for i in range(a.batch):
        eng.submit(GenerationRequest(condition=i, seed=i, sampling=sp), lambda ev: None)
    for _ in range(300):  # into the steady state (past the budget, graphs captured)
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        eng.step()
    t_host = time.perf_counter() - t0
    torch.cuda.synchronize()
    t_all = time.perf_counter() - t0
    print(f"per step: host issue {1000 * t_host / a.steps:.2f} ms, wall {1000 * t_all / a.steps:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
    print_by_part(prof, 5)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
