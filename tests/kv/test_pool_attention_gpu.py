"""Triton pool-attention kernel against the torch oracle (run on the device machine: -m gpu)."""

from __future__ import annotations

import pytest
import torch

from adsa_core.kv.attention import gather_slots, pool_attention, pool_attention_torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU machines too; the marker deselects it there
    pytest.skip("needs a CUDA device", allow_module_level=True)

try:  # the CPU test module beside this one: its case generator and tie planting
    from test_pool_attention import make_case, plant_ties  # noqa: E402
except ImportError:  # tests/kv became a package
    from .test_pool_attention import make_case, plant_ties  # noqa: E402

from adsa_core.kv.kernels.pool_attention import pool_attention_triton  # noqa: E402

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
