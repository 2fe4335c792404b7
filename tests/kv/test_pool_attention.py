"""CPU tests of the pool-attention oracle against naive dense references.

`make_case` and the naive references are reused by test_pool_attention_gpu.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from adsa_core.kv.attention import pool_attention, pool_attention_torch, pool_decode
from adsa_core.kv.decode_state import DecodeRows, LayerState
from adsa_core.kv.policy import LINE, LINE_DECAY, KVPolicy, register, unregister

# a toy policy, registered only by the tests that ask for it: evict the newest candidate
NEWEST = KVPolicy("newest", 9, lambda redundancy, position, attention: position.float())


def make_case(B, H, Hkv, D, page=16, max_slots=96, dtype=torch.float32, device="cpu", seed=0, n_slots=None,
              q_scale=1.0):
    """Random pool with scattered pages, random n_slots, unique positions per (row, head), random
    eviction ranges and modes (dense, adsa, window, line). Values share a common direction so redundancies are
    spread out. Line rows' stat is a random attention score; lse is each row's true log-sum-exp plus noise (the
    previous step's), +inf on row 0 (its first step). q_scale > 1 spreads the scores: later slots then pass a
    row's running maximum by many log2 units, which the kernel's online softmax must rescale for."""
    g = torch.Generator().manual_seed(seed)
    max_pages = -(-max_slots // page)
    P = B * max_pages + 5  # a few pages nobody owns
    block_table = torch.randperm(P, generator=g)[: B * max_pages].view(B, max_pages).int()
    if n_slots is None:
        n_slots = torch.randint(1, max_slots + 1, (B,), generator=g)
    n_slots = torch.as_tensor(n_slots).int()
    for b in range(B):  # unused entries hold garbage; nothing may read them
        block_table[b, -(-int(n_slots[b]) // page) :] = -1
    common = torch.randn(D, generator=g)
    k = torch.randn(P, Hkv, page, D, generator=g)
    v = torch.randn(P, Hkv, page, D, generator=g) + 0.7 * common
    v = v * torch.rand(P, Hkv, page, 1, generator=g).add(0.2)  # varied norms: cosine must ignore them
    k, v = k.to(dtype), v.to(dtype)
    T = 2 * P * page  # positions come from a longer sequence: evicted tokens leave gaps
    # unique per head, and >= 1 so that tests can plant the smallest position 0
    pos = torch.stack([torch.randperm(T, generator=g)[: P * page] + 1 for _ in range(Hkv)], 1)
    pos = pos.view(P, page, Hkv).transpose(1, 2).contiguous().int()  # (P * page, Hkv) -> (P, Hkv, page)
    stat = 1.0 / v.float().norm(dim=-1).clamp_min(1e-6)
    lo = torch.randint(0, T // 2, (B,), generator=g)
    hi = lo + torch.randint(0, T // 2, (B,), generator=g)
    mode = torch.randint(0, 4, (B,), generator=g)
    q = (torch.randn(B, H, D, generator=g) * q_scale).to(dtype)
    case = dict(q=q, k_cache=k, v_cache=v, pos_cache=pos, stat=stat, vsum=None, lse=None,
                block_table=block_table, n_slots=n_slots, evict_lo=lo.int(), evict_hi=hi.int(),
                mode=mode.int(), scale=1.0 / math.sqrt(D))  # fmt: skip
    case["vsum"] = torch.stack(
        [torch.stack([(vv.float() * inv[:, None]).sum(0) for _, vv, _, inv in dense_rows(case, b)])
         for b in range(B)]
    )  # fmt: skip  # (B, Hkv, D)
    case["lse"] = naive_lse(case) + torch.randn(B, H, generator=g).double() * 0.3
    case["lse"][0] = float("inf")
    case["lse"] = case["lse"].float()
    set_modes(case, case["mode"])
    return {name: t.to(device) if torch.is_tensor(t) else t for name, t in case.items()}


def set_modes(case, mode):
    """Give the rows these modes, with the slot statistic each needs: 1/|V|, or for line rows a random attention
    score (a tenth of them exactly 0: ties, which go to the lowest slot). vsum stays the sum of unit values."""
    case["mode"] = torch.as_tensor(mode, dtype=torch.int32, device=case["mode"].device).clone()
    stat, page = case["stat"], case["k_cache"].shape[2]
    g = torch.Generator().manual_seed(int(case["n_slots"].sum()))
    for b in range(len(case["mode"])):
        s = torch.arange(int(case["n_slots"][b]))
        pages, off = case["block_table"][b].long().cpu()[s // page], s % page
        v = case["v_cache"][pages, :, off].float()  # (n, Hkv, D)
        value = 1.0 / v.norm(dim=-1).clamp_min(1e-6)
        if int(case["mode"][b]) == LINE.mode:
            value = torch.rand(value.shape, generator=g) * (torch.rand(value.shape, generator=g) > 0.1)
        stat[pages, :, off] = value.to(stat.device)


def dense_rows(case, b):
    """Row b materialised by slot, one (K, V, pos, stat) per kv head, valid slots only."""
    page = case["k_cache"].shape[2]
    n = int(case["n_slots"][b])
    s = torch.arange(n, device=case["k_cache"].device)
    pages, off = case["block_table"][b].long()[s // page], s % page
    return [
        tuple(case[name][pages, h, off] for name in ("k_cache", "v_cache", "pos_cache", "stat"))
        for h in range(case["k_cache"].shape[1])
    ]


def naive_attention(case):
    """Plain softmax attention per row and query head, float64."""
    B, H, D = case["q"].shape
    G = H // case["k_cache"].shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        rows = dense_rows(case, b)
        for h in range(H):
            k, v = rows[h // G][0].double().cpu(), rows[h // G][1].double().cpu()
            w = torch.softmax(k @ case["q"][b, h].double().cpu() * case["scale"], dim=0)
            out[b, h] = w @ v
    return out


def naive_lse(case):
    """log-sum-exp of each row's and query head's scores over its valid slots, float64 (B, H)."""
    B, H, D = case["q"].shape
    G = H // case["k_cache"].shape[1]
    out = torch.empty(B, H, dtype=torch.float64)
    for b in range(B):
        rows = dense_rows(case, b)
        for h in range(H):
            out[b, h] = torch.logsumexp(rows[h // G][0].double().cpu() @ case["q"][b, h].double().cpu()
                                        * case["scale"], dim=0)
    return out


def naive_line_score(case, b, h):
    """a_i after this step for row b, kv head h (kv.policy, line): decay a_i + sum over the kv head's query
    heads of exp(q.k_i * scale - previous lse), float64."""
    H = case["q"].shape[1]
    G = H // case["k_cache"].shape[1]
    k, _, _, a = dense_rows(case, b)[h]
    p = sum(torch.exp((k.double().cpu() @ case["q"][b, g].double().cpu() * case["scale"]
                       - float(case["lse"][b, g])).clamp_max(0.0)) for g in range(h * G, (h + 1) * G))
    return LINE_DECAY * a.double().cpu() + p


def naive_redundancy(v):
    """r_i = mean cosine similarity of value i to the other values, from the pairwise matrix."""
    n = v.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    u = v.double().cpu()
    u = u / u.norm(dim=-1, keepdim=True)
    cos = u @ u.T  # (n, n)
    return (cos.sum(1) - cos.diagonal()) / (n - 1)


def check_victims(case, victim, rel_tie=1e-5):
    """Every (row, head) victim against a naive recomputation; near-ties (< rel_tie) accept either.
    Modes: 0 dense (no victim), 1 adsa, 2 window (oldest), 3 line (least attended), 9 the toy NEWEST (newest).
    `case` holds the pool and lse as they were before the pass (a line pass updates both)."""
    B, Hkv = victim.shape
    for b in range(B):
        m, lo, hi = (int(case[name][b]) for name in ("mode", "evict_lo", "evict_hi"))
        for h, (_, v, pos, _) in enumerate(dense_rows(case, b)):
            pos = pos.long().cpu()
            cand = torch.nonzero((pos >= lo) & (pos <= hi)).flatten()
            got = int(victim[b, h])
            if m == 0 or cand.numel() == 0:
                assert got == -1, (b, h, m)
                continue
            assert got in cand.tolist(), (b, h, got)
            if m in (2, NEWEST.mode):  # positions are unique per head: no ties
                want = cand[pos[cand].argmin() if m == 2 else pos[cand].argmax()]
                assert got == int(want), (b, h, got, int(want))
                continue
            r = -naive_line_score(case, b, h) if m == LINE.mode else naive_redundancy(v)
            want = int(cand[r[cand].argmax()])
            if got != want:  # only a near-tie may pick differently
                gap = float(r[want] - r[got])
                assert gap <= rel_tie * max(1.0, float(r[want].abs())), (b, h, got, want, gap)


def fresh(case):
    """A copy of the case's tensors: a pass updates stat and lse in place, the naive checks read them as before."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in case.items()}


def rel_err(out, ref):
    return float((out.double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize("H,Hkv,D", [(8, 8, 64), (8, 2, 64), (4, 4, 100), (6, 2, 100)])
@pytest.mark.parametrize("page", [16, 32])
def test_oracle_matches_dense_reference(H, Hkv, D, page):
    case = make_case(B=5, H=H, Hkv=Hkv, D=D, page=page, max_slots=150, seed=H * D + page)
    out, victim = pool_attention_torch(**fresh(case))
    assert out.shape == (5, H, D) and out.dtype == torch.float32
    assert victim.shape == (5, Hkv) and victim.dtype == torch.int32
    assert rel_err(out, naive_attention(case)) < 1e-5


def test_oracle_low_precision_output_dtype():
    case = make_case(B=3, H=4, Hkv=4, D=64, dtype=torch.bfloat16, seed=7)
    out, _ = pool_attention_torch(**fresh(case))
    assert out.dtype == torch.bfloat16
    assert rel_err(out, naive_attention(case)) < 1e-2


@pytest.mark.parametrize("Hkv,D", [(4, 64), (2, 100)])
def test_adsa_victim_is_most_redundant_candidate(Hkv, D):
    case = make_case(B=12, H=2 * Hkv, Hkv=Hkv, D=D, max_slots=200, seed=D)
    set_modes(case, torch.ones_like(case["mode"]))
    _, victim = pool_attention_torch(**fresh(case))
    assert (victim >= 0).any()
    check_victims(case, victim)


def test_mixed_modes_and_window_picks_smallest_position():
    case = make_case(B=16, H=4, Hkv=4, D=64, seed=3)
    assert set(case["mode"].tolist()) == {0, 1, 2, 3}
    _, victim = pool_attention_torch(**fresh(case))
    check_victims(case, victim)


def test_no_candidate_gives_minus_one():
    case = make_case(B=4, H=4, Hkv=2, D=64, seed=5)
    set_modes(case, [0, 1, 2, LINE.mode])
    case["evict_lo"] = torch.tensor([0, 10_000, 10_000, 5], dtype=torch.int32)  # no position that large
    case["evict_hi"] = torch.tensor([10_000, 20_000, 20_000, 4], dtype=torch.int32)  # lo > hi: empty
    _, victim = pool_attention_torch(**fresh(case))
    assert (victim == -1).all()


def plant_ties(case, b, slots):
    """Give row b's `slots` (in every head) one identical, most-redundant value and the smallest
    position, so both modes see an exact tie among them. Recomputes that row's vsum."""
    page = case["k_cache"].shape[2]
    bt = case["block_table"][b].long()
    for h in range(case["k_cache"].shape[1]):
        _, v, _, _ = dense_rows(case, b)[h]
        top = v.float().mean(0)  # the mean direction is the most redundant one
        for s in slots:
            at = (bt[s // page], h, s % page)
            case["v_cache"][at] = (3 * top / top.norm()).to(v.dtype)
            case["pos_cache"][at] = 0  # make_case positions are >= 1
            case["stat"][at] = 1.0 / case["v_cache"][at].float().norm()
        _, v, _, inv = dense_rows(case, b)[h]
        case["vsum"][b, h] = (v.float() * inv[:, None]).sum(0)


@pytest.mark.parametrize("mode", [1, 2])
def test_ties_go_to_lowest_slot(mode):
    case = make_case(B=3, H=2, Hkv=2, D=64, max_slots=160, n_slots=[160, 160, 160], seed=11)
    case["evict_lo"].fill_(0)
    case["evict_hi"].fill_(10_000)
    set_modes(case, torch.full_like(case["mode"], mode))
    ties = [[130, 9, 77], [5, 7], [140, 70]]  # across and within slot blocks, not in slot order
    for b, slots in enumerate(ties):
        plant_ties(case, b, slots)
    _, victim = pool_attention_torch(**fresh(case))
    assert victim.tolist() == [[min(s)] * 2 for s in ties]


def test_dispatch_on_cpu_is_the_oracle():
    case = make_case(B=3, H=4, Hkv=2, D=64, seed=13)
    out, victim = pool_attention(**fresh(case))
    ref_out, ref_victim = pool_attention_torch(**fresh(case))
    assert torch.equal(out, ref_out) and torch.equal(victim, ref_victim)


@pytest.fixture
def newest():
    with pytest.warns(UserWarning, match="no Triton kernel rule"):
        register(NEWEST)
    yield NEWEST
    unregister(NEWEST.name)


def test_a_registered_toy_policy_picks_its_victims_beside_the_built_in_ones(newest):
    case = make_case(B=24, H=4, Hkv=2, D=64, seed=17)
    set_modes(case, [0, 1, 2, NEWEST.mode] * 6)  # dense, adsa, window, newest
    _, victim = pool_attention(**fresh(case))  # the CPU dispatch: the oracle, ranking by each row's policy
    check_victims(case, victim)
    assert (victim[case["mode"] == NEWEST.mode] >= 0).any()


def test_a_mode_nobody_registered_never_evicts():
    case = make_case(B=8, H=4, Hkv=2, D=64, seed=17)
    set_modes(case, [NEWEST.mode, 2] * 4)
    _, victim = pool_attention(**fresh(case))
    assert (victim[0::2] == -1).all() and (victim[1::2] >= 0).any()


def test_decode_overwrites_the_toy_policys_victim(newest):
    """Two decode steps of full rows (newest, window): the first writes its token over slot 0 (no victim
    yet) and picks the next victim, the newest candidate being that token; the second overwrites it."""
    B, Hkv, D = 2, 2, 16
    case = make_case(B, H=2, Hkv=Hkv, D=D, max_slots=40, n_slots=[40, 40], seed=19)
    rows = DecodeRows(case["block_table"], case["n_slots"].clone(), case["n_slots"].clone(),
                      prefix=torch.zeros(B, dtype=torch.int32), local=torch.ones(B, dtype=torch.int32),
                      mode=torch.tensor([newest.mode, 2], dtype=torch.int32),
                      position=torch.full((B,), 10**6))  # newer than every stored position
    layer = LayerState(case["k_cache"], case["v_cache"], case["pos_cache"], case["stat"], case["vsum"],
                       case["lse"], torch.full((B, Hkv), -1, dtype=torch.int32), torch.zeros(B, Hkv, D),
                       torch.zeros(B, Hkv, D), torch.zeros(B, Hkv, dtype=torch.int32))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    step = lambda: pool_decode(case["q"], *torch.randn(2, B, Hkv, D, generator=g), layer, rows, 0.25)  # noqa: E731

    step()
    # the pool tensors are the case's, written in place: the victims against the naive rules
    check_victims({**case, "evict_lo": rows.prefix, "evict_hi": rows.position.int(), "mode": rows.mode}, layer.victim)
    assert layer.victim[0].tolist() == [0, 0]
    rows.position += 1
    step()
    assert layer.spill_pos[0].tolist() == [10**6] * Hkv  # newest: the token written one step ago
    assert (layer.spill_pos[1] < 10**6).all()  # window: the oldest one


def test_line_scores_every_line_rows_slots_and_every_rows_lse():
    case = make_case(B=16, H=4, Hkv=2, D=32, seed=23)
    assert (case["mode"] == LINE.mode).sum() >= 3
    after = fresh(case)
    _, victim = pool_attention_torch(**after)
    check_victims(case, victim)
    assert (victim[case["mode"] == LINE.mode] >= 0).any()
    torch.testing.assert_close(after["lse"].double(), naive_lse(case), rtol=1e-5, atol=1e-5)
    for b in range(16):
        for h, (_, _, _, a) in enumerate(dense_rows(after, b)):
            if int(case["mode"][b]) == LINE.mode:
                torch.testing.assert_close(a.double(), naive_line_score(case, b, h), rtol=1e-5, atol=1e-7)
            else:  # 1/|V| of the other policies is left alone
                assert torch.equal(a, dense_rows(case, b)[h][3])
    untouched = torch.ones_like(case["stat"], dtype=torch.bool)
    for b in range(16):
        untouched[case["block_table"][b][case["block_table"][b] >= 0].long()] = False
    assert torch.equal(after["stat"][untouched], case["stat"][untouched])  # nobody's pages: never written


def naive_line_sequence(qs, ks, vs, budget, prefix, local, scale):
    """The line policy on one sequence, written out: a list of cached tokens, exact softmax per step, each
    token's score a <- decay a + exp(s - previous step's lse) summed over the query heads, the least-scored
    candidate evicted (lowest slot on ties). Returns per step the evicted position (-1: none) and the output."""
    slots: list[dict] = []
    lse_prev = torch.full((qs.shape[1],), float("inf"), dtype=torch.float64)
    victim, evicted, outs = None, [], []
    for t, (q, k, v) in enumerate(zip(qs.double(), ks.double(), vs.double())):
        new = dict(k=k, v=v, pos=t, a=0.0)
        if len(slots) < budget:
            slots.append(new)
            evicted.append(-1)
        else:
            evicted.append(slots[victim]["pos"])
            slots[victim] = new
        K = torch.stack([x["k"] for x in slots])  # (n, D)
        V = torch.stack([x["v"] for x in slots])
        sc = q @ K.T * scale  # (H, n)
        p = torch.exp((sc - lse_prev[:, None]).clamp_max(0.0)).sum(0)
        for x, pi in zip(slots, p.tolist()):
            x["a"] = LINE_DECAY * x["a"] + pi
        lse_prev = torch.logsumexp(sc, dim=1)
        outs.append(torch.softmax(sc, dim=1) @ V)
        victim = None
        if len(slots) >= budget:
            cand = [i for i, x in enumerate(slots) if prefix <= x["pos"] <= t + 1 - local]
            victim = min(cand, key=lambda i: (slots[i]["a"], i))
    return evicted, torch.stack(outs)


def test_line_decode_follows_the_naive_sequence():
    """40 decode steps of one line row (GQA: 2 query heads share its kv head) through pool_decode against the
    naive list-of-tokens implementation: the same token evicted at every step, the same outputs."""
    T, H, D, page, budget, prefix, local = 40, 2, 8, 4, 12, 2, 4
    g = torch.Generator().manual_seed(29)
    qs, ks, vs = torch.randn(3, T, H, D, generator=g).unbind(0)
    ks = ks[:, :1]  # one kv head
    vs = vs[:, :1]
    want_evicted, want_out = naive_line_sequence(qs, ks[:, 0], vs[:, 0], budget, prefix, local, 0.5)
    P = 5
    # a stale stat of 7.0 everywhere: a new slot's score must start at 0
    layer = LayerState(torch.zeros(P, 1, page, D), torch.zeros(P, 1, page, D),
                       torch.zeros(P, 1, page, dtype=torch.int32), torch.full((P, 1, page), 7.0),
                       torch.zeros(1, 1, D), torch.full((1, H), float("inf")),
                       torch.full((1, 1), -1, dtype=torch.int32), torch.zeros(1, 1, D), torch.zeros(1, 1, D),
                       torch.zeros(1, 1, dtype=torch.int32))
    i32 = dict(dtype=torch.int32)
    rows = DecodeRows(torch.tensor([[3, 1, 4]], **i32), torch.zeros(1, **i32), torch.tensor([budget], **i32),
                      torch.tensor([prefix], **i32), torch.tensor([local], **i32), torch.tensor([LINE.mode], **i32),
                      torch.zeros(1, dtype=torch.long))  # fmt: skip
    for t in range(T):
        rows.position.fill_(t)
        full, n_slots = rows.after_write()
        out = pool_decode(qs[t][None], ks[t][None], vs[t][None], layer, rows, 0.5)
        got = int(layer.spill_pos[0, 0]) if bool(full[0]) else -1
        assert got == want_evicted[t], (t, got, want_evicted[t])
        torch.testing.assert_close(out[0].double(), want_out[t], rtol=1e-5, atol=1e-5)
        rows.n_stored.copy_(n_slots)
    assert sum(e >= 0 for e in want_evicted) == T - budget


def test_small_grids_walk_wider_blocks_as_run_28_measured():
    pytest.importorskip("triton")
    from adsa_core.kv.kernels.pool_attention import default_config

    # GPT-XL (20 kv heads of 64) at batches 1, 2, 4 and 8 with CFG: 40, 80, 160 and 320 programs
    launches = [(c["block_n"], c["num_warps"]) for c in (default_config(1, 64, 16, 20 * 2 * b, fp8=True)
                                                       for b in (1, 2, 4, 8))]
    assert launches == [(256, 8), (256, 8), (128, 4), (64, 2)]
    assert (default_config(1, 64, 16, 4096, fp8=True)["block_n"], default_config(1, 100, 16, 40)["block_n"]) == (16, 16)


def test_the_conditional_rescale_is_chosen_where_run_24_measured_it_pays():
    pytest.importorskip("triton")
    from adsa_core.kv.kernels.pool_attention import FEW_PROGRAMS, default_config

    batch_512 = 20 * 1024  # GPT-XL's kv heads x 1024 CFG rows: fp8 with 64-wide heads, where it won
    assert default_config(1, 64, 16, batch_512, fp8=True)["lazy_rescale"]
    # bf16 (no more programs an SM), small grids (batches 1 and 8: slower), unmeasured head sizes and GQA: eager
    assert not default_config(1, 64, 16, batch_512, fp8=False)["lazy_rescale"]
    assert not default_config(1, 64, 16, FEW_PROGRAMS, fp8=True)["lazy_rescale"]
    assert not default_config(1, 100, 16, batch_512, fp8=True)["lazy_rescale"]
    assert not default_config(4, 64, 16, batch_512, fp8=True)["lazy_rescale"]


def test_the_l2_prefetch_runs_where_run_31_measured_it():
    pytest.importorskip("triton")
    from adsa_core.kv.kernels.pool_attention import FEW_PROGRAMS, default_config

    batch_512 = 20 * 1024
    assert default_config(1, 64, 16, batch_512, fp8=True)["ahead"] == 1  # 151 -> 138 µs for the write launch
    # small grids prefetch their whole row before the PDL wait instead (run 30); bf16 would lose occupancy to it
    for args, fp8 in (((1, 64, 16, FEW_PROGRAMS), True), ((1, 64, 16, batch_512), False),
                      ((1, 100, 16, batch_512), True), ((4, 64, 16, batch_512), True)):
        assert default_config(*args, fp8=fp8)["ahead"] == 0, args
