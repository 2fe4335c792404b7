"""Teacher-forced KL between a full-precision and an fp8 KV cache on the demo model (CPU).

    PYTHONPATH=. python3 tools/fp8_kv_kl.py 64    # 64 classes spread over the demo's, seeds 2000..

Dense samples (the demo's default sampling) are forced through the engine with kv_cache_dtype
"auto" and "fp8", dense and adsa at budget 1/2: mean KL(auto || fp8) per token and top-1 agreement
(docs/FIDELITY.md, "fp8 KV cache").
"""

from __future__ import annotations

import sys

import torch

from adsa_core.config import CacheConfig
from adsa_core.engine import GenerationRequest
from adsa_core.engine.offline import run_requests
from adsa_core.loading import ModelSpec, load_models
from adsa_core.sampling import SamplingParams


def main(n: int) -> None:
    models = load_models(ModelSpec(device="cpu"))
    labels = [i * models.gpt_config.num_classes // n for i in range(n)]
    sampling = SamplingParams(**models.sampling_defaults)

    def run(kv: str, forced: list[torch.Tensor] | None = None, policy: str = "dense", budget=None) -> list:
        out: dict = {}
        reqs = [GenerationRequest(condition=c, seed=2000 + i, sampling=sampling, request_id=str(i),
                                  want_logits=forced is not None, forced_tokens=None if forced is None else forced[i],
                                  cache=CacheConfig(policy=policy, budget=budget))
                for i, c in enumerate(labels)]
        run_requests(models, reqs, 32, out.__setitem__, kv_cache_dtype=kv)
        return [out[i] for i in range(n)]

    codes = [ev.codes for ev in run("auto")]
    for policy, budget in (("dense", None), ("adsa", 0.5)):
        full = torch.stack([ev.logprobs for ev in run("auto", codes, policy, budget)])  # (n, T, V)
        fp8 = torch.stack([ev.logprobs for ev in run("fp8", codes, policy, budget)])
        kl = (full.exp() * (full - fp8)).sum(-1)
        agree = (full.argmax(-1) == fp8.argmax(-1)).float().mean()
        print(f"{policy} {budget}: KL(full||fp8) {kl.mean():.5f}, top-1 agree {agree:.4f}, n={n}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
