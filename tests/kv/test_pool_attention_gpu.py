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
    from test_pool_attention import make_case, plant_ties  # noqa: E402
except ImportError:  # tests/kv became a package
    from .test_pool_attention import make_case, plant_ties  # noqa: E402

from adsa_core.kv.decode_state import DecodeRows, LayerState  # noqa: E402
from adsa_core.kv.kernels.pool_attention import pool_attention_triton, pool_decode_triton  # noqa: E402
from adsa_core.kv.pool import FP8, FP8_MAX, raw, to_kv_storage  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 oracle must be true fp32
# relative L2 error bounds, after METHOD.md: fp32 far under 1e-3, bf16 operands 1e-3..1e-2
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def upcast(case):
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case.items()}


def redundancy(case):
    """v̂_i·S per (row, kv head, slot), fp32, as the oracle forms it."""
    v = gather_slots(case["v_cache"], case["block_table"]).float()  # (B, Hkv, N, D)
    inv = gather_slots(case["inv_norm"], case["block_table"])  # (B, Hkv, N)
    return inv * torch.einsum("bhnd,bhd->bhn", v, case["vsum"])


def assert_matches_oracle(case, out, victim):
    ref_out, ref_victim = pool_attention_torch(**upcast(case))
    assert out.dtype == case["q"].dtype and victim.dtype == torch.int32
    assert torch.isfinite(out).all()
    err = float((out.float() - ref_out).norm() / ref_out.norm())
    assert err < TOL[case["q"].dtype], err
    diff = torch.nonzero(victim != ref_victim)
    if len(diff):  # only a near-tie in v̂·S may pick another slot (rounding order differs)
        red = redundancy(case)
        for b, h in diff.tolist():
            assert int(case["mode"][b]) == 1, (b, h)
            got, want = int(victim[b, h]), int(ref_victim[b, h])
            assert got >= 0 and want >= 0, (b, h, got, want)
            a, r = float(red[b, h, got]), float(red[b, h, want])
            assert abs(a - r) <= 1e-5 * max(1.0, abs(r)), (b, h, got, want, a, r)


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
        case["mode"].fill_(1)
        case["evict_lo"].fill_(0)
    out, victim = pool_attention(**case)
    assert_matches_oracle(case, out, victim)
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
    v = v * gather_slots(case["inv_norm"], bt)[..., None]
    case["vsum"].copy_((v * valid[:, None, :, None]).sum(2))


@pytest.mark.parametrize("block_n", [16, 32, 128])
@pytest.mark.parametrize("mode", [1, 2])
def test_ties_lowest_slot_any_block_size(mode, block_n):
    case = make_case(B=3, H=4, Hkv=2, D=64, max_slots=160, n_slots=[160, 160, 160], seed=11)
    case["evict_lo"].fill_(0)
    case["evict_hi"].fill_(10_000)
    case["mode"].fill_(mode)
    ties = [[130, 9, 77], [5, 7], [140, 70]]  # across and within slot blocks
    for b, slots in enumerate(ties):
        plant_ties(case, b, slots)
    case = {k: v.cuda() if torch.is_tensor(v) else v for k, v in case.items()}
    _, victim = pool_attention_triton(**case, block_n=block_n)
    assert victim.tolist() == [[min(s)] * 2 for s in ties]


@pytest.mark.parametrize("cfg", [(16, 1), (32, 8), (128, 4), (64, 2)])
def test_tuning_configs_are_correct(cfg):
    block_n, warps = cfg
    for H, Hkv, D in [(20, 20, 64), (8, 2, 100)]:
        case = make_case(B=9, H=H, Hkv=Hkv, D=D, max_slots=300, dtype=torch.bfloat16, device="cuda", seed=D)
        out, victim = pool_attention_triton(**case, block_n=block_n, num_warps=warps)
        assert_matches_oracle(case, out, victim)


@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_page_32(block_n):
    case = make_case(
        B=20, H=8, Hkv=8, D=64, page=32, max_slots=400, dtype=torch.bfloat16, device="cuda", seed=3
    )
    assert_matches_oracle(case, *pool_attention_triton(**case, block_n=block_n))


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
    graph.replay()
    assert_matches_oracle(case, out, victim)


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
    layer = LayerState(case["k_cache"], case["v_cache"], case["pos_cache"], case["inv_norm"], case["vsum"],
                       victim, torch.zeros(B, Hkv, D, dtype=dtype), torch.zeros(B, Hkv, D, dtype=dtype),
                       torch.zeros(B, Hkv, dtype=torch.int32))  # fmt: skip
    return case["q"], kv[:, :, 1], kv[:, :, 2], layer, rows, case["scale"]


def to_cuda(obj):
    fields = {k: v.cuda() if torch.is_tensor(v) else v for k, v in obj.__dict__.items()}
    return type(obj)(**fields)


def written_pool(q, layer, rows, n_slots, scale) -> dict:
    """The attention oracle's arguments for the pool after a decode step's write."""
    return dict(q=q, k_cache=layer.k, v_cache=layer.v, pos_cache=layer.pos, inv_norm=layer.inv_norm,
                vsum=layer.vsum, block_table=rows.block_table, n_slots=n_slots, evict_lo=rows.prefix,
                evict_hi=(rows.position + 1 - rows.local).int(), mode=torch.where(n_slots >= rows.budget, rows.mode, 0),
                scale=scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B,H,Hkv,D", [(12, 20, 20, 64), (9, 8, 2, 100), (64, 16, 16, 64)])
def test_fused_decode_matches_torch_step(B, H, Hkv, D, dtype):
    q, k_new, v_new, layer, rows, scale = make_decode_case(B, H, Hkv, D, dtype, seed=B + D)
    q, k_new, v_new = q.cuda(), k_new.cuda(), v_new.cuda()
    rows = to_cuda(rows)
    ref_layer, got_layer = to_cuda(layer), to_cuda(layer)
    ref_out = pool_decode_torch(q, k_new, v_new, ref_layer, rows, scale)
    got_out = pool_decode_triton(q, k_new, v_new, got_layer, rows, scale)
    for name in ("k", "v", "pos", "spill_k", "spill_v", "spill_pos"):  # stored and staged bytes: exact
        assert torch.equal(getattr(got_layer, name), getattr(ref_layer, name)), name
    torch.testing.assert_close(got_layer.inv_norm, ref_layer.inv_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_layer.vsum, ref_layer.vsum, rtol=1e-5, atol=1e-4)
    full, n_slots = rows.after_write()
    assert full.any() and (~full).any()
    # the attention and victim of the written pool, against the attention oracle
    after = written_pool(q, ref_layer, rows, n_slots, scale)
    assert_matches_oracle(after, got_out, got_layer.victim)
    assert_matches_oracle(after, ref_out, ref_layer.victim)
    assert (got_layer.victim[n_slots < rows.budget] == -1).all()
    assert (got_layer.victim >= 0).any()


@pytest.mark.parametrize("B,H,Hkv,D", [(12, 20, 20, 64), (9, 8, 2, 100)])
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
    torch.testing.assert_close(got_layer.inv_norm, ref_layer.inv_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_layer.vsum, ref_layer.vsum, rtol=1e-4, atol=1e-3)
    full, n_slots = rows.after_write()
    after = written_pool(q, ref_layer, rows, n_slots, scale)
    assert_matches_oracle(after, got_out, got_layer.victim)
    assert_matches_oracle(after, ref_out, ref_layer.victim)
