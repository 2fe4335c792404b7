"""On the device: the engine (CUDA graphs, Triton pool attention) against the reference sampler."""

from __future__ import annotations

import json
import os

import pytest
import torch

from adsa_core.config import CacheConfig, EngineConfig, GPTConfig
from adsa_core.engine import Engine, Finished, GenerationRequest
from adsa_core.loading import LoadedModels
from adsa_core.model import load_gpt
from adsa_core.reference import generate
from adsa_core.sampling import SamplingParams

pytestmark = pytest.mark.gpu
CFG = GPTConfig(dim=768, n_layer=12, n_head=12, vocab_size=16384, block_size=256, num_classes=1000)  # GPT-B 256 px


def run_engine(models, labels, sp, policy="dense", budget=None) -> torch.Tensor:
    eng = Engine(models, EngineConfig(device="cuda", max_batch_size=len(labels), page_size=16,
                                      default_cache=CacheConfig(policy=policy, budget=budget)))
    done = {}
    for i, c in enumerate(labels.tolist()):
        eng.submit(GenerationRequest(condition=c, seed=i, sampling=sp, request_id=str(i)),
                   lambda ev, i=i: done.__setitem__(i, ev))
    while eng.has_work:
        eng.step()
    eng.close()
    assert all(isinstance(done[i], Finished) for i in range(len(labels)))
    return torch.stack([done[i].codes for i in range(len(labels))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_matches_reference_on_gpu(dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    gpt = load_gpt(CFG, None, "cuda", dtype)
    models = LoadedModels("gpt-b", gpt, None, CFG, None, 256, torch.device("cuda"), dtype)
    labels = torch.arange(16, device="cuda") * 37 % 1000
    sp = SamplingParams(cfg_scale=4.0, greedy=True)
    ref = generate(gpt, labels, sp).cpu()
    got = run_engine(models, labels, sp)
    agree = (got == ref).float().mean().item()
    full = run_engine(models, labels, sp, "adsa", 1.0)  # budget = whole sequence: dense by construction
    agree_adsa = (full == ref).float().mean().item()
    line = json.dumps({"test": "engine_vs_reference", "dtype": str(dtype), "token_agreement_dense": agree,
                       "token_agreement_adsa_full_budget": agree_adsa, "card": torch.cuda.get_device_name()})
    print(line)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_agreement.jsonl"), "a") as f:
            f.write(line + "\n")
    # fp32: the same function, up to reduction order. bf16: batched matmuls differ in the last bit,
    # random weights give near-tied logits and one flipped arg-max changes everything after it in
    # that image (measured 48% on an H200): the bound only catches a broken path (random: ~0%).
    assert agree >= (0.98 if dtype == torch.float32 else 0.25)
    assert agree_adsa >= (0.98 if dtype == torch.float32 else 0.25)
