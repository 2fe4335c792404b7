"""Where the compiled reference's time went: its generation timed with each change of issue 19 undone in turn.

Variants, in this order (each adds one change to the one before; two full-model compiles in all):
  sync+eager+sdpa  the old loop's costs: a host sync per token (as the old `torch.tensor(pos, device=...)`
                   did), eager sampling (~60 small kernels), SDPA's default backend (memory-efficient)
  eager+sdpa       no host sync
  sdpa             sampling compiled
  new              math attention under Inductor, as LlamaGen's decode loop: what `generate` runs now
One JSON line per (variant, batch): gen_s and ms per token (VQ decode excluded: it is the same for all).

    PYTHONPATH=$PWD python3 tools/reference_ab.py --batches 1,64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from adsa_core import reference
from adsa_core.config import VQConfig, gpt_preset
from adsa_core.eval.bench import random_models
from adsa_core.sampling import SamplingParams

VARIANTS = ("sync+eager+sdpa", "eager+sdpa", "sdpa", "new")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="GPT-XL")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    dev = torch.device(a.device)
    cfg = gpt_preset(a.preset, a.image_size)
    models = random_models(cfg, VQConfig(), a.preset, a.image_size, dev,
                           torch.bfloat16 if dev.type == "cuda" else torch.float32)
    sampling = SamplingParams(cfg_scale=4.0, top_k=2000)
    compiled_pick, math_attention = reference._compiled_pick, reference.sdpa_kernel

    def sync(_: int = 0) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for variant in VARIANTS:
        # undo the changes this variant leaves out (module attributes that generate() looks up per call)
        reference._compiled_pick = compiled_pick if variant in ("sdpa", "new") else (lambda: reference._pick)
        reference.sdpa_kernel = math_attention if variant == "new" else (lambda *_: contextlib.nullcontext())
        if variant == "new":  # the attention backend is chosen when the step is traced: trace it again
            torch._dynamo.reset()
            reference._compiled_step.cache_clear()
            reference._compiled_pick.cache_clear()
        on_token = sync if variant.startswith("sync") else None
        for batch in (int(b) for b in a.batches.split(",")):
            labels = torch.arange(batch, device=dev) % cfg.num_classes
            seeds = torch.arange(batch, device=dev)
            kw = dict(seeds=seeds, compile_step=dev.type == "cuda", on_token=on_token)
            reference.generate(models.gpt, labels, sampling, **kw)  # compile, graphs
            sync()
            t0 = time.perf_counter()
            reference.generate(models.gpt, labels, sampling, **kw)
            sync()
            gen_s = time.perf_counter() - t0
            print(json.dumps({"variant": variant, "batch": batch, "gen_s": round(gen_s, 4),
                              "ms_per_token": round(1000 * gen_s / cfg.block_size, 3)}), flush=True)
            reference.release_static_caches()


if __name__ == "__main__":
    main()
