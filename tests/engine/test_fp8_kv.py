"""The fp8 KV pool (EngineConfig.kv_cache_dtype="fp8") on CPU: what is stored, its byte layout
through swap and spill, and how close the model stays to its full-precision cache."""

from __future__ import annotations

import pytest
import torch

from adsa_core.config import ConfigError, EngineConfig
from adsa_core.engine import Engine, GenerationRequest
from adsa_core.kv.pool import FP8, FP8_MAX, PoolGeometry, to_kv_storage
from adsa_core.sampling import SamplingParams

from .test_engine import UNSEEN, codes_of, make_engine, run_all, tiny_models


def test_fp8_storage_saturates_instead_of_overflowing():
    x = torch.tensor([0.0, 1.0, -3.3, 500.0, -1e6, 448.0])
    got = to_kv_storage(x, FP8).float()
    assert torch.isfinite(got).all()
    assert got.tolist()[3:] == [FP8_MAX, -FP8_MAX, FP8_MAX]
    assert (got[:3] - x[:3]).abs().max() <= 0.125  # e4m3: 3 mantissa bits, 1/16 relative at 3.3
    assert torch.equal(to_kv_storage(x, torch.float32), x)


def test_fp8_pool_halves_the_kv_bytes_per_slot():
    bf16 = PoolGeometry(n_layer=4, kv_heads=2, head_dim=64, page_size=16, num_pages=10, dtype=torch.bfloat16)
    fp8 = PoolGeometry(n_layer=4, kv_heads=2, head_dim=64, page_size=16, num_pages=10, dtype=FP8)
    # K + V per slot and head: 2 * 64 * 2 bytes vs 2 * 64 * 1, plus 8 bytes of position and 1/|V| either way
    assert bf16.bytes_per_token == 4 * 2 * (256 + 8) and fp8.bytes_per_token == 4 * 2 * (128 + 8)


def test_unknown_kv_cache_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        Engine(tiny_models(UNSEEN), EngineConfig(kv_cache_dtype="int4"))


def teacher_forced(models, kv_cache_dtype: str, policy: str, budget, codes: torch.Tensor, labels: list[int]):
    """Log-probs (n, block_size, V) of `codes` forced through an engine with this KV cache."""
    eng = make_engine(models, policy, budget, kv_cache_dtype=kv_cache_dtype, local=7)
    reqs = [GenerationRequest(condition=c, seed=0, sampling=SamplingParams(cfg_scale=1.0), forced_tokens=codes[i],
                              want_logits=True, request_id=str(i)) for i, c in enumerate(labels)]
    ev = run_all(eng, reqs)
    assert all(torch.equal(codes_of(ev, str(i)), codes[i]) for i in range(len(labels)))
    return torch.stack([ev[str(i)][-1].logprobs for i in range(len(labels))]), eng


@pytest.mark.parametrize("policy,budget", [("dense", None), ("adsa", 0.5)])
def test_fp8_cache_stays_close_to_the_full_precision_cache(policy, budget):
    models = tiny_models(UNSEEN, seed=3)
    labels = [0, 2, 4, 6]
    sp = SamplingParams(cfg_scale=1.0, temperature=1.0)
    ev = run_all(make_engine(models), [GenerationRequest(condition=c, seed=i, sampling=sp, request_id=str(i))
                                       for i, c in enumerate(labels)])
    codes = torch.stack([codes_of(ev, str(i)) for i in range(len(labels))])
    full, _ = teacher_forced(models, "auto", policy, budget, codes, labels)
    fp8, eng = teacher_forced(models, "fp8", policy, budget, codes, labels)
    assert eng.runner.pool.k[0].dtype == FP8 and eng.runner.rows.spill_k.dtype == FP8
    kl = (full.exp() * (full - fp8)).sum(-1)  # KL(full || fp8) per token
    assert kl.mean() < 1e-3, kl.mean()  # measured ~1e-5 (dense) and ~3e-5 (adsa 1/2)
    assert (full.argmax(-1) == fp8.argmax(-1)).float().mean() > 0.9  # random weights: near-ties flip
    assert kl.mean() > 0  # fp8 is really in use


def test_fp8_pool_round_trips_swap_and_spill_bytes():
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=4.0, temperature=1.0)
    eng = make_engine(models, "adsa", 0.5, local=7, kv_cache_dtype="fp8", kv_pool_tokens=40,  # one CFG request
                      spill_limit_bytes=1 << 30)
    low = GenerationRequest(condition=1, seed=5, sampling=sp, priority=0, request_id="low")
    high = GenerationRequest(condition=2, seed=6, sampling=sp, priority=1, request_id="high")
    events: dict = {}
    eng.submit(low, lambda ev: events.setdefault("low", []).append(ev))
    for _ in range(24):  # past the budget: "low" has evicted and spilled fp8 slots
        eng.step()
    item = eng.requests["low"]
    units = [block.start + i for block, i in item.spill[0].entries]  # its spilled steps in the ring
    kv = eng.spill.kv[units].view(FP8)  # each unit: K then V (L, H, D) as stored
    assert len(units) > 0 and torch.isfinite(kv.float()).all()
    eng.submit(high, lambda ev: events.setdefault("high", []).append(ev))
    eng.step()  # "high" swaps "low" out
    assert eng.requests["low"].swap_data is not None
    while eng.has_work:
        eng.step()
    eng.close()
    assert events["low"][-1].stats.swapped_out == 1
    # the same request without the swap: identical tokens, so the fp8 bytes came back unchanged
    alone = run_all(make_engine(models, "adsa", 0.5, local=7, kv_cache_dtype="fp8"), [low])
    assert torch.equal(codes_of(events, "low"), codes_of(alone, "low"))
