"""Pool bookkeeping, cache-config validation and the spill ring, against hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from adsa_core.config import CacheConfig, ConfigError, GPTConfig
from adsa_core.kv.pool import PageAllocator, PoolExhausted, PoolGeometry, pages_for
from adsa_core.kv.spill import SpillArena, SpillRecord

CFG = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=32, block_size=64, num_classes=3)  # 8x8 grid


def test_allocator_never_hands_out_scratch_or_overcommits():
    a = PageAllocator(5)
    got = a.allocate(4)
    assert sorted(got) == [1, 2, 3, 4] and a.num_free == 0
    with pytest.raises(PoolExhausted):
        a.allocate(1)
    a.free(got[:2])
    assert a.num_free == 2 and set(a.allocate(2)) == set(got[:2])


def test_geometry_accounts_bytes():
    geo = PoolGeometry.for_model(CFG, page_size=16, num_pages=11, dtype=torch.bfloat16)
    assert geo.capacity_tokens == 160
    assert geo.bytes_per_token == 2 * 4 * (2 * 16 * 2 + 8)  # layers * heads * (K+V bf16 + pos + 1/|V|)
    assert pages_for(17, 16) == 2


@pytest.mark.parametrize("kw,msg", [
    (dict(budget=1.5), "outside"), (dict(budget=0.0), "outside"), (dict(budget=-3), "positive"),
    (dict(policy="lru"), "unknown KV policy"), (dict(budget=True), "boolean"),
])
def test_cache_config_rejects_nonsense(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        CacheConfig(**kw)


def test_budget_must_exceed_prefix_plus_local_and_fractions_resolve():
    with pytest.raises(ConfigError, match="larger than prefix"):
        CacheConfig(policy="adsa", budget=10, prefix=1, local=9).resolve(CFG)
    r = CacheConfig(policy="adsa", budget=0.5).resolve(CFG)  # defaults: prefix = 1 cond token, local = row + 1
    assert (r.budget, r.prefix, r.local, r.seq_len) == (32, 1, 9, 64) and r.evicts
    assert CacheConfig(policy="dense", budget=0.1).resolve(CFG).budget == CFG.seq_len
    assert not CacheConfig(policy="window", budget=None).resolve(CFG).evicts


def test_spill_ring_wraps_reclaims_and_drops_when_full():
    arena = SpillArena(capacity_bytes=0, n_layer=2, kv_heads=3, head_dim=4, dtype=torch.float32,
                       device=torch.device("cpu"))
    arena = SpillArena(5 * arena.step_bytes, 2, 3, 4, torch.float32, torch.device("cpu"))
    recs = [SpillRecord() for _ in range(3)]

    def step(owners, fill):
        n = len(owners)
        k = torch.full((2, n, 3, 4), float(fill))
        return arena.store(k, -k, torch.full((2, n, 3), fill, dtype=torch.int32), owners)

    assert step(recs[:2], 1) and step(recs[:2], 2)  # 4 of 5 units used
    assert not step(recs[:2], 3) and arena.dropped_steps == 1  # no room for 2 more
    assert step([recs[2]], 4)
    k, v, pos = arena.read(recs[0])
    assert k[:, 0, 0, 0].tolist() == [1, 2] and torch.equal(v, -k) and pos[:, 1, 2].tolist() == [1, 2]
    arena.release(recs[0])
    assert not step([recs[0], recs[1]], 5)  # block 1 still owned by recs[1]
    arena.release(recs[1])
    assert step([recs[0], recs[1]], 6)  # wrapped around to the start
    assert arena.read(recs[2])[0][:, 0, 0, 0].tolist() == [4]
    assert arena.read(recs[1])[2][:, 0, 0].tolist() == [6]
