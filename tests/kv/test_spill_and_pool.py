"""Pool bookkeeping, cache-config validation and the spill ring, against hand-worked cases."""

from __future__ import annotations

import random

import pytest
import torch

from adsa_core.config import CacheConfig, ConfigError, GPTConfig
from adsa_core.kv.pool import FP8, PageAllocator, PoolExhausted, PoolGeometry, pages_for
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
    r = CacheConfig(policy="adsa", budget=0.5).resolve(CFG)
    assert (r.budget, r.seq_len) == (32, 64) and r.evicts
    # default regions (config.default_regions), 8x8 grid: m = two rows + 1 (17) when it fits in 7/8 of the
    # budget, else one row + 1 (9); n = what is left of the 7/8, at most 1 + one row (9), at least 1
    assert (r.prefix, r.local) == (9, 17)
    small = CacheConfig(policy="adsa", budget=16).resolve(CFG)  # 7/8 of 16 = 14: one row + 1, n = 5
    assert (small.prefix, small.local) == (5, 9)
    tiny = CacheConfig(policy="adsa", budget=11).resolve(CFG)  # floors n = 1, m = 9, still valid
    assert (tiny.prefix, tiny.local) == (1, 9)
    with pytest.raises(ConfigError, match="larger than prefix 1 . local window 9"):
        CacheConfig(policy="adsa", budget=10).resolve(CFG)  # below the floors: a clear error, as before
    # explicit values are kept exactly; the other default fits around them
    r = CacheConfig(policy="adsa", budget=16, prefix=2).resolve(CFG)
    assert (r.prefix, r.local) == (2, 9)
    r = CacheConfig(policy="adsa", budget=16, local=12).resolve(CFG)
    assert (r.prefix, r.local) == (2, 12)
    r = CacheConfig(policy="adsa", budget=32, prefix=20, local=3).resolve(CFG)
    assert (r.prefix, r.local) == (20, 3)
    assert CacheConfig(policy="dense", budget=0.1).resolve(CFG).budget == CFG.seq_len
    assert not CacheConfig(policy="window", budget=None).resolve(CFG).evicts


def stored(arena: SpillArena, rec: SpillRecord, shape: tuple[int, int, int], dtype: torch.dtype):
    """A record's spilled (K, V, positions), (steps, L, H, D) x2 and (steps, L, H), read from the ring by hand:
    step j of the record is unit block.start + row of its j-th entry; a unit holds K then V as bytes."""
    units = [block.start + row for block, row in rec.entries]
    kv = arena.kv[units].view(dtype).view(len(units), 2, *shape)
    return kv[:, 0], kv[:, 1], arena.pos[units].view(len(units), *shape[:2])


def test_spill_ring_wraps_reclaims_and_drops_when_full():
    arena = SpillArena(capacity_bytes=0, n_layer=2, kv_heads=3, head_dim=4, dtype=torch.float32,
                       device=torch.device("cpu"))
    arena = SpillArena(5 * arena.step_bytes, 2, 3, 4, torch.float32, torch.device("cpu"))
    recs = [SpillRecord() for _ in range(3)]

    def step(owners, fill):
        n = len(owners)
        k = torch.full((2, n, 3, 4), float(fill))
        return arena.store(k, -k, torch.full((2, n, 3), fill, dtype=torch.int32), torch.arange(n), owners)

    read = lambda rec: stored(arena, rec, (2, 3, 4), torch.float32)  # noqa: E731
    assert step(recs[:2], 1) and step(recs[:2], 2)  # 4 of 5 units used
    assert (arena.dropped_steps, arena.dropped_bytes) == (0, 0)
    assert not step(recs[:2], 3) and arena.dropped_steps == 1  # no room for 2 more
    assert arena.dropped_bytes == 2 * (2 * 2 * 3 * 4 * 4 + 2 * 3 * 4)  # 2 rows of fp32 K, V and int32 positions
    assert step([recs[2]], 4)
    assert arena.store(torch.empty(2, 0, 3, 4), torch.empty(2, 0, 3, 4), torch.empty(2, 0, 3), torch.arange(0), [])
    k, v, pos = read(recs[0])
    assert k[:, 0, 0, 0].tolist() == [1, 2] and torch.equal(v, -k) and pos[:, 1, 2].tolist() == [1, 2]
    arena.release(recs[0])
    assert not step([recs[0], recs[1]], 5)  # block 1 still owned by recs[1]
    assert arena.dropped_steps == 2  # a step with nothing to spill drops nothing
    arena.release(recs[1])
    assert step([recs[0], recs[1]], 6)  # wrapped around to the start
    assert read(recs[2])[0][:, 0, 0, 0].tolist() == [4]
    assert read(recs[1])[2][:, 0, 0].tolist() == [6]


def test_spill_ring_never_overwrites_a_live_block():
    """Random stores and releases against the ring's invariant: the units of blocks still owned never overlap, and
    every owner reads back what it stored. (A wrap that ended exactly at the oldest live block read as an empty ring:
    the next store overwrote that block and was counted as spilled.)"""
    rng = random.Random(0)
    arena = SpillArena(0, 1, 1, 2, torch.float32, torch.device("cpu"))
    arena = SpillArena(10 * arena.step_bytes, 1, 1, 2, torch.float32, torch.device("cpu"))
    live: list[tuple[SpillRecord, int]] = []  # (owner, the value it stored)
    stored_steps = dropped = 0
    for value in range(1, 800):
        if live and rng.random() < 0.45:
            rec, _ = live.pop(rng.randrange(len(live)))
            arena.release(rec)
            continue
        owners = [SpillRecord() for _ in range(rng.randint(1, 5))]
        k = torch.full((1, len(owners), 1, 2), float(value))
        if arena.store(k, k, torch.full((1, len(owners), 1), value, dtype=torch.int32), torch.arange(len(owners)),
                       owners):
            stored_steps += 1
            live += [(rec, value) for rec in owners]
        else:
            dropped += 1
        units = sorted({(b.start + i) for rec, _ in live for b, i in rec.entries})
        assert len(units) == len(live), "two live owners share a unit"
        for rec, v in live:
            assert stored(arena, rec, (1, 1, 2), torch.float32)[2].flatten().tolist() == [v]
    assert stored_steps > 100 and dropped > 10 and dropped == arena.dropped_steps  # wraps and full rings both ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8])
@pytest.mark.parametrize("heads,dim", [(3, 4), (2, 8), (1, 3), (3, 1)])  # 8-, 4-, 2-byte words and bytes
def test_spill_store_keeps_the_bytes_of_the_gathered_staging_rows(dtype, heads, dim):
    L, R = 3, 6
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(L, R, heads, dim, generator=g).to(dtype) for _ in range(2))
    pos = torch.randint(0, 1 << 30, (L, R, heads), generator=g, dtype=torch.int32)
    arena = SpillArena(0, L, heads, dim, dtype, torch.device("cpu"))
    arena = SpillArena(16 * arena.step_bytes, L, heads, dim, dtype, torch.device("cpu"))
    steps = [[4, 1, 5], [0], [5, 2]]  # rows overwritten per step (a row's record spills each step it is listed)
    recs = {r: SpillRecord() for r in range(R)}
    for rows in steps:
        assert arena.store(k, v, pos, torch.tensor(rows), [recs[r] for r in rows])
    b = lambda t: t.view(torch.uint8)  # noqa: E731
    for r, rec in recs.items():
        got_k, got_v, got_pos = stored(arena, rec, (L, heads, dim), dtype)
        n = sum(r in rows for rows in steps)
        assert got_k.dtype == dtype and got_k.shape == (n, L, heads, dim) and got_pos.shape == (n, L, heads)
        # the naive byte gather: row r of every layer, once per step that spilled it
        assert torch.equal(b(got_k), b(k)[:, [r] * n].transpose(0, 1))
        assert torch.equal(b(got_v), b(v)[:, [r] * n].transpose(0, 1))
        assert torch.equal(got_pos, pos[:, [r] * n].transpose(0, 1))
