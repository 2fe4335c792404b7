"""Where the compiled reference's time goes on the GPU: its generation with the sampling compiled or eager, and
(--profile) the kernels of a few of its decode steps.

Variants (the step is traced once; only the sampling changes between them):
  compiled-pick  what `generate(compile_step=True)` runs: the step under "reduce-overhead", sampling compiled
  eager-pick     the same step, the sampling eager (~60 small kernels)
One JSON line per (variant, batch): gen_s and ms per token (VQ decode excluded: it is the same for all); with
--profile, each variant's top kernels over 5 decode steps after the first 100 tokens.

    PYTHONPATH=$PWD python3 tools/reference_ab.py --batches 1,64 --profile
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from adsa_core import reference
from adsa_core.config import VQConfig, gpt_preset
from adsa_core.eval.bench import random_models
from adsa_core.sampling import SamplingParams

VARIANTS = ("compiled-pick", "eager-pick")
PROFILED_STEPS = 5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="GPT-XL")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--profile", action="store_true", help="print each variant's top kernels per decode step")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    dev = torch.device(a.device)
    cfg = gpt_preset(a.preset, a.image_size)
    models = random_models(cfg, VQConfig(), a.preset, a.image_size, dev,
                           torch.bfloat16 if dev.type == "cuda" else torch.float32)
    sampling = SamplingParams(cfg_scale=4.0, top_k=2000)
    compiled_pick = reference._compiled_pick

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for variant in a.variants.split(","):
        if variant not in VARIANTS:
            p.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        # a module attribute that generate() looks up per call
        reference._compiled_pick = compiled_pick if variant == "compiled-pick" else (lambda: reference._pick)
        for batch in (int(b) for b in a.batches.split(",")):
            labels = torch.arange(batch, device=dev) % cfg.num_classes
            kw = dict(seeds=torch.arange(batch, device=dev), compile_step=dev.type == "cuda")
            reference.generate(models.gpt, labels, sampling, **kw)  # compile, graphs
            sync()
            t0 = time.perf_counter()
            reference.generate(models.gpt, labels, sampling, **kw)
            sync()
            gen_s = time.perf_counter() - t0
            print(json.dumps({"variant": variant, "batch": batch, "gen_s": round(gen_s, 4),
                              "ms_per_token": round(1000 * gen_s / cfg.block_size, 3)}), flush=True)
            if a.profile:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                steps = schedule(wait=100, warmup=2, active=PROFILED_STEPS)
                with profile(activities=activities, schedule=steps) as prof:
                    reference.generate(models.gpt, labels, sampling, on_token=lambda _: prof.step(), **kw)
                    sync()
                sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
                print(f"# {variant}, batch {batch}: top kernels over {PROFILED_STEPS} decode steps")
                print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=70), flush=True)
            reference.release_static_caches()


if __name__ == "__main__":
    main()
