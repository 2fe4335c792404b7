"""Triton pool-attention kernel against the torch oracle (run on the device machine: -m gpu)."""

from __future__ import annotations

import pytest
import torch

from adsa_core.kv.attention import (
    gather_slots,
    pool_attention,
    pool_attention_torch,
    pool_decode_torch,
)

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU machines too; the marker deselects it there
    pytest.skip("needs a CUDA device", allow_module_level=True)

try:  # the CPU test module beside this one: its case generator and tie planting
    from test_pool_attention import fresh, make_case, plant_ties, set_modes  # noqa: E402
except ImportError:  # tests/kv became a package
    from .test_pool_attention import fresh, make_case, plant_ties, set_modes  # noqa: E402

from adsa_core.kv.decode_state import DecodeRows, LayerState  # noqa: E402
from adsa_core.kv.kernels.pool_attention import pool_attention_triton, pool_decode_triton  # noqa: E402
from adsa_core.kv.policy import LINE  # noqa: E402
from adsa_core.kv.pool import FP8, FP8_MAX, raw, to_kv_storage  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 oracle must be true fp32
# relative L2 error bounds, after METHOD.md: fp32 far under 1e-3, bf16 operands 1e-3..1e-2
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def upcast(case):
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case.items()}


def redundancy(case):
    """v̂_i·S per (row, kv head, slot), fp32, as the oracle forms it."""
    v = gather_slots(case["v_cache"], case["block_table"]).float()  # (B, Hkv, N, D)
    inv = gather_slots(case["stat"], case["block_table"])  # (B, Hkv, N)
    return inv * torch.einsum("bhnd,bhd->bhn", v, case["vsum"])


def assert_victims_agree(before, after, mode, victim, ref_victim):
    """Victims equal the oracle's but for near-ties of the key (rounding order differs): v̂·S over the pool
    `before` the pass (adsa), or the attention score a_i the oracle left in `after` (line)."""
    diff = torch.nonzero(victim != ref_victim)
    if not len(diff):
        return
    red = redundancy(before)
    score = gather_slots(after["stat"], after["block_table"])
    for b, h in diff.tolist():
        m = int(mode[b])
        assert m in (1, LINE.mode), (b, h, m)
        got, want = int(victim[b, h]), int(ref_victim[b, h])
        assert got >= 0 and want >= 0, (b, h, got, want)
        key = red if m == 1 else score
        a, r = float(key[b, h, got]), float(key[b, h, want])
        assert abs(a - r) <= 1e-5 * max(1.0, abs(r)), (b, h, got, want, a, r)


def assert_matches_oracle(case, out, victim, got=None):
    """One pass (out, victim; `got`: the case's tensors after it) against the oracle on `case`, the state before
    the pass: out within TOL, victims but for near-ties, line scores and every lse close."""
    ref = fresh(upcast(case))
    ref_out, ref_victim = pool_attention_torch(**ref)
    assert out.dtype == case["q"].dtype and victim.dtype == torch.int32
    assert torch.isfinite(out).all()
    err = float((out.float() - ref_out).norm() / ref_out.norm())
    assert err < TOL[case["q"].dtype], err
    assert_victims_agree(upcast(case), ref, case["mode"], victim, ref_victim)
    if got is not None:
        torch.testing.assert_close(got["stat"], ref["stat"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["lse"], ref["lse"], rtol=1e-4, atol=1e-4)


def run_and_check(fn, case, **kw):
    """fn (a pass: pool_attention or the Triton launch) on a copy of `case`, checked against the oracle."""
    got = fresh(case)
    out, victim = fn(**got, **kw)
    assert_matches_oracle(case, out, victim, got)
    return out, victim


SHAPES = [  # (B, H, Hkv, D): MHA and GQA, D 64 (GPT-B..XXL) and 100 (GPT-3B)
    (1, 20, 20, 64),
    (7, 8, 2, 100),
    (64, 6, 6, 100),
    (64, 8, 2, 64),
    (256, 4, 4, 64),
    (256, 4, 1, 100),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B,H,Hkv,D", SHAPES)
def test_triton_matches_oracle(B, H, Hkv, D, dtype):
    g = torch.Generator().manual_seed(B * D)
    n_slots = torch.randint(1, 577, (B,), generator=g)
    n_slots[0] = 576  # the longest row, and the shortest one
    n_slots[-1] = 1 if B > 1 else 576
    case = make_case(B, H, Hkv, D, max_slots=576, dtype=dtype, device="cuda", seed=B + D, n_slots=n_slots)
    if B == 1:
        set_modes(case, [1])
        case["evict_lo"].fill_(0)
    _, victim = run_and_check(pool_attention, case)
    assert (victim >= 0).any()
    if B >= 64:
        assert (victim == -1).any()


def refresh(case):
    """After shrinking n_slots in place: mark dropped pages unused and recompute vsum in place."""
    bt, page = case["block_table"], case["k_cache"].shape[2]
    for b in range(bt.shape[0]):
        bt[b, -(-int(case["n_slots"][b]) // page) :] = -1
    slot = torch.arange(bt.shape[1] * page, device=bt.device)
    valid = slot[None, :] < case["n_slots"][:, None].long()  # (B, N)
    v = gather_slots(case["v_cache"], bt).float()  # (B, Hkv, N, D)
    v = v * gather_slots(case["stat"], bt)[..., None]
    case["vsum"].copy_((v * valid[:, None, :, None]).sum(2))


@pytest.mark.parametrize("block_n", [16, 32, 128, 256])
@pytest.mark.parametrize("mode", [1, 2])
def test_ties_lowest_slot_any_block_size(mode, block_n):
    case = make_case(B=3, H=4, Hkv=2, D=64, max_slots=160, n_slots=[160, 160, 160], seed=11)
    case["evict_lo"].fill_(0)
    case["evict_hi"].fill_(10_000)
    set_modes(case, torch.full_like(case["mode"], mode))
    ties = [[130, 9, 77], [5, 7], [140, 70]]  # across and within slot blocks
    for b, slots in enumerate(ties):
        plant_ties(case, b, slots)
    case = {k: v.cuda() if torch.is_tensor(v) else v for k, v in case.items()}
    _, victim = pool_attention_triton(**case, block_n=block_n)
    assert victim.tolist() == [[min(s)] * 2 for s in ties]


@pytest.mark.parametrize("cfg", [(16, 1), (32, 8), (128, 4), (64, 2), (256, 8)])
def test_tuning_configs_are_correct(cfg):
    block_n, warps = cfg
    for H, Hkv, D in [(20, 20, 64), (8, 2, 100)]:
        case = make_case(B=9, H=H, Hkv=Hkv, D=D, max_slots=300, dtype=torch.bfloat16, device="cuda", seed=D)
        run_and_check(pool_attention_triton, case, block_n=block_n, num_warps=warps)


@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_page_32(block_n):
    case = make_case(
        B=20, H=8, Hkv=8, D=64, page=32, max_slots=400, dtype=torch.bfloat16, device="cuda", seed=3
    )
    run_and_check(pool_attention_triton, case, block_n=block_n)


def test_cuda_graph_replay_follows_inputs():
    case = make_case(B=16, H=8, Hkv=8, D=64, max_slots=200, dtype=torch.bfloat16, device="cuda", seed=21)
    pool_attention(**case)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, victim = pool_attention(**case)
    # new data in the same buffers: fewer slots, other candidates, other queries
    case["n_slots"].copy_((case["n_slots"] // 2).clamp_min(1))
    case["evict_lo"].zero_()
    case["q"].normal_()
    refresh(case)
    before = fresh(case)
    graph.replay()
    assert_matches_oracle(before, out, victim, case)


def make_decode_case(B, H, Hkv, D, dtype, seed):
    """A decode step over a random pool: full rows overwrite a victim (or -1 -> slot 0), rows one
    short of their budget fill their last slot (and need a victim after), others just append."""
    g = torch.Generator().manual_seed(seed)
    n_slots = torch.randint(3, 300, (B,), generator=g)
    case = make_case(B, H, Hkv, D, max_slots=300, dtype=dtype, seed=seed, n_slots=n_slots)
    budget = case["n_slots"].clone()
    kind = torch.arange(B) % 3  # 0: full, 1: one short of the budget, 2: two short
    n_stored = budget - kind.int()
    victim = torch.stack([torch.randint(-1, int(n), (Hkv,), generator=g) for n in budget]).int()
    position = 2 * case["pos_cache"].numel() + torch.arange(B)  # newer than every stored position
    local = (position + 1 - case["evict_hi"]).int().clamp_min(1)
    rows = DecodeRows(case["block_table"], n_stored.int(), budget.int(), case["evict_lo"], local,
                      case["mode"].clamp_min(1), position)  # fmt: skip
    kv = torch.randn(B, Hkv, 3, D, generator=g).to(dtype)  # k and v as strided views, like the model's
    layer = LayerState(case["k_cache"], case["v_cache"], case["pos_cache"], case["stat"], case["vsum"],
                       case["lse"], victim, torch.zeros(B, Hkv, D, dtype=dtype), torch.zeros(B, Hkv, D, dtype=dtype),
                       torch.zeros(B, Hkv, dtype=torch.int32))  # fmt: skip
    return case["q"], kv[:, :, 1], kv[:, :, 2], layer, rows, case["scale"]


def to_cuda(obj):
    fields = {k: v.cuda() if torch.is_tensor(v) else v for k, v in obj.__dict__.items()}
    return type(obj)(**fields)


def written_pool(layer, rows) -> dict:
    """The pool after a decode step, as gather_slots' and redundancy()'s arguments."""
    return dict(v_cache=layer.v, stat=layer.stat, vsum=layer.vsum, block_table=rows.block_table)


def assert_same_step(got_layer, ref_layer, rows, got_out, ref_out, dtype):
    """A fused decode step against the torch step from the same state: out, S, lse, scores, victims."""
    err = float((got_out.float() - ref_out.float()).norm() / ref_out.float().norm())
    assert err < TOL[dtype], err
    torch.testing.assert_close(got_layer.lse, ref_layer.lse, rtol=1e-4, atol=1e-4)
    after = written_pool(ref_layer, rows)
    assert_victims_agree(after, after, rows.mode, got_layer.victim, ref_layer.victim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B,H,Hkv,D", [(12, 20, 20, 64), (2, 20, 20, 64), (9, 8, 2, 100), (64, 16, 16, 64)])
def test_fused_decode_matches_torch_step(B, H, Hkv, D, dtype):
    q, k_new, v_new, layer, rows, scale = make_decode_case(B, H, Hkv, D, dtype, seed=B + D)
    q, k_new, v_new = q.cuda(), k_new.cuda(), v_new.cuda()
    rows = to_cuda(rows)
    ref_layer, got_layer = to_cuda(layer), to_cuda(layer)
    ref_out = pool_decode_torch(q, k_new, v_new, ref_layer, rows, scale)
    got_out = pool_decode_triton(q, k_new, v_new, got_layer, rows, scale)
    for name in ("k", "v", "pos", "spill_k", "spill_v", "spill_pos"):  # stored and staged bytes: exact
        assert torch.equal(getattr(got_layer, name), getattr(ref_layer, name)), name
    torch.testing.assert_close(got_layer.stat, ref_layer.stat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_layer.vsum, ref_layer.vsum, rtol=1e-5, atol=1e-4)
    full, n_slots = rows.after_write()
    assert full.any() and (~full).any() and (rows.mode == LINE.mode).any()
    assert_same_step(got_layer, ref_layer, rows, got_out, ref_out, dtype)
    assert (got_layer.victim[n_slots < rows.budget] == -1).all()
    assert (got_layer.victim >= 0).any()


@pytest.mark.parametrize("B,H,Hkv,D", [(12, 20, 20, 64), (2, 20, 20, 64), (9, 8, 2, 100)])  # (2, ...): 256 x 8
def test_fused_decode_with_an_fp8_pool_matches_torch_step(B, H, Hkv, D):
    """K/V stored as e4m3 (kv_cache_dtype="fp8"): the kernel writes the same saturated bytes as the
    oracle (new values up to 4x past the fp8 range), stages the old fp8 bytes, and attends over them."""
    q, k_new, v_new, layer, rows, scale = make_decode_case(B, H, Hkv, D, torch.bfloat16, seed=B + D + 1)
    layer.k, layer.v = to_kv_storage(layer.k, FP8), to_kv_storage(layer.v, FP8)
    layer.spill_k, layer.spill_v = layer.spill_k.to(FP8), layer.spill_v.to(FP8)
    k_new, v_new = k_new * 600, v_new * 3  # K beyond +-448: the saturating path
    q, k_new, v_new = q.cuda(), k_new.cuda(), v_new.cuda()
    rows = to_cuda(rows)
    ref_layer, got_layer = to_cuda(layer), to_cuda(layer)
    ref_out = pool_decode_torch(q, k_new, v_new, ref_layer, rows, scale)
    got_out = pool_decode_triton(q, k_new, v_new, got_layer, rows, scale)
    for name in ("k", "v", "spill_k", "spill_v"):  # stored and staged fp8 bytes
        got, ref = raw(getattr(got_layer, name)), raw(getattr(ref_layer, name))
        assert (got != ref).sum() <= got.numel() // 10000, name  # rounding ties only
    assert torch.isfinite(got_layer.k.float()).all() and got_layer.k.float().abs().max() == FP8_MAX
    for name in ("pos", "spill_pos"):
        assert torch.equal(getattr(got_layer, name), getattr(ref_layer, name)), name
    torch.testing.assert_close(got_layer.stat, ref_layer.stat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_layer.vsum, ref_layer.vsum, rtol=1e-4, atol=1e-3)
    assert_same_step(got_layer, ref_layer, rows, got_out, ref_out, torch.bfloat16)


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_line_rows_follow_the_torch_steps_over_a_sequence(kv):
    """GPT-XL-like line rows (20 heads, D 64) decoded 24 steps past their budget by the fused kernel; every step
    is checked against the torch step from the same state (the kernel's state carries on): the slot each step
    evicts, the scores, the normalisers."""
    B, H, D, budget = 32, 20, 64, 96
    case = make_case(B, H, H, D, max_slots=budget, dtype=torch.bfloat16, seed=31, n_slots=[budget] * B)
    set_modes(case, [LINE.mode] * B)
    g = torch.Generator().manual_seed(31)
    position = 2 * case["pos_cache"].numel() + torch.zeros(B, dtype=torch.long)
    rows = to_cuda(DecodeRows(case["block_table"], case["n_slots"].clone(), case["n_slots"].clone(),
                              torch.full((B,), 4, dtype=torch.int32), torch.full((B,), 9, dtype=torch.int32),
                              case["mode"], position))  # fmt: skip
    layer = to_cuda(LayerState(case["k_cache"], case["v_cache"], case["pos_cache"], case["stat"], case["vsum"],
                               case["lse"], torch.full((B, H), -1, dtype=torch.int32),
                               torch.zeros(B, H, D, dtype=torch.bfloat16), torch.zeros(B, H, D, dtype=torch.bfloat16),
                               torch.zeros(B, H, dtype=torch.int32)))  # fmt: skip
    if kv == "fp8":
        layer.k, layer.v = to_kv_storage(layer.k, FP8), to_kv_storage(layer.v, FP8)
        layer.spill_k, layer.spill_v = layer.spill_k.to(FP8), layer.spill_v.to(FP8)
    for step in range(24):
        q, k_new, v_new = (torch.randn(B, H, D, generator=g).to(torch.bfloat16).cuda() for _ in range(3))
        ref_layer = LayerState(**{k: v.clone() for k, v in layer.__dict__.items()})
        ref_out = pool_decode_torch(q, k_new, v_new, ref_layer, rows, case["scale"])
        got_out = pool_decode_triton(q, k_new, v_new, layer, rows, case["scale"])
        if step:  # the first step overwrites slot 0 (no victim yet); then the victims chosen the step before
            agree = (layer.spill_pos == ref_layer.spill_pos).float().mean()
            assert agree == 1.0, (step, float(agree))
        torch.testing.assert_close(layer.stat, ref_layer.stat, rtol=1e-4, atol=1e-6)
        assert_same_step(layer, ref_layer, rows, got_out, ref_out, torch.bfloat16)
        assert (layer.victim >= 0).all()
        rows.position += 1
