"""The Triton kernel run by Triton's CPU interpreter (TRITON_INTERPRET=1) against the torch oracle and the
naive references of test_pool_attention.py, on tiny fp32 shapes.

test_pool_attention_gpu.py covers the compiled kernel at real shapes on the device machine; this covers its
logic (paging, masking, online softmax, victim choice, the fused write) on any machine where Triton is
installed. It runs in a child process: the interpreter is chosen when the kernel module is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def test_kernel_matches_the_oracle_under_the_interpreter(under_triton_interpreter):
    assert "kernel cases match" in under_triton_interpreter(__file__)


def _check_attention(make_case, check_victims, fresh, set_modes) -> int:
    import torch

    from adsa_core.kv.attention import pool_attention_torch
    from adsa_core.kv.kernels.pool_attention import pool_attention_triton

    n = 0
    for B, H, Hkv, D in [(5, 4, 4, 16), (5, 4, 2, 24)]:  # MHA; GQA through tl.dot with D padded to 32
        # half a page (the sweep's smallest), one page, two, four (small grids); q_scale 12: scores spread over
        # ~20 log2 units, so later blocks pass a lane's running maximum by more than the conditional rescale's
        # slack; short rows (an empty one, rows shorter than a block: early decode) start lanes at -inf
        short = torch.tensor([5, 0, 3, 17, 40], dtype=torch.int32)
        for block_n, q_scale, lazy, n_slots in [(8, 1.0, False, None), (16, 1.0, False, None), (32, 1.0, False, None),
                                                (64, 1.0, False, None), (256, 1.0, False, None),
                                                (8, 12.0, True, None), (16, 12.0, True, None),
                                                (16, 12.0, False, None), (16, 12.0, True, short)]:
            case = make_case(B, H, Hkv, D, max_slots=40, seed=B * D + block_n, q_scale=q_scale, n_slots=n_slots)
            set_modes(case, [9, 1, 2, 3, 3])  # 9: a mode the kernel does not implement: no victim, as in the oracle
            got, ref = fresh(case), fresh(case)  # a pass updates stat (line rows) and lse in place
            out, victim = pool_attention_triton(**got, block_n=block_n, lazy_rescale=lazy)
            ref_out, ref_victim = pool_attention_torch(**ref)
            assert float((out - ref_out).norm() / ref_out.norm()) < 1e-5, (B, H, Hkv, D, block_n, lazy, n_slots)
            assert torch.equal(victim, ref_victim), (victim, ref_victim)
            torch.testing.assert_close(got["stat"], ref["stat"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["lse"], ref["lse"], rtol=1e-5, atol=1e-5)
            assert not torch.equal(got["stat"], case["stat"])  # the line rows were scored
            assert (victim[0] == -1).all() and (victim >= 0).any()
            case["mode"][0] = 0
            check_victims(case, victim)
            n += 1
    return n


def _check_decode(make_case) -> int:
    import torch

    from adsa_core.kv.attention import pool_decode_torch
    from adsa_core.kv.decode_state import DecodeRows, LayerState
    from adsa_core.kv.kernels.pool_attention import pool_decode_triton

    n = 0
    for B, H, Hkv, D in [(6, 2, 2, 16), (6, 4, 2, 24)]:
        g = torch.Generator().manual_seed(B + D)
        case = make_case(B, H, Hkv, D, max_slots=40, seed=B + D, n_slots=torch.randint(3, 41, (B,), generator=g))
        budget = case["n_slots"].clone()
        n_stored = budget - (torch.arange(B) % 3).int()  # full, one short of the budget, two short
        victim = torch.stack([torch.randint(-1, int(b), (Hkv,), generator=g) for b in budget]).int()
        position = 2 * case["pos_cache"].numel() + torch.arange(B)  # newer than every stored position
        local = (position + 1 - case["evict_hi"]).int().clamp_min(1)
        mode = torch.tensor([1, 2, 3] * (B // 3), dtype=torch.int32)  # adsa, window, line
        # row 1 (window, full after the write): head 0's newest slot is its only candidate, at the edge of the
        # local window, hi = position + 1 - local, so the window's bound is checked to the position
        slots, page = torch.arange(int(n_stored[1])), case["k_cache"].shape[2]
        newest = int(case["pos_cache"][case["block_table"][1, slots // page].long(), 0, slots % page].max())
        case["evict_lo"][1], local[1] = newest, int(position[1]) + 1 - newest
        rows = DecodeRows(case["block_table"], n_stored, budget, case["evict_lo"], local, mode, position)
        k_new, v_new = torch.randn(2, B, Hkv, D, generator=g)

        def layer(case=case, victim=victim, B=B, Hkv=Hkv, D=D):
            c = {k: v.clone() for k, v in case.items() if torch.is_tensor(v)}
            return LayerState(c["k_cache"], c["v_cache"], c["pos_cache"], c["stat"], c["vsum"], c["lse"],
                              victim.clone(), torch.zeros(B, Hkv, D), torch.zeros(B, Hkv, D),
                              torch.zeros(B, Hkv, dtype=torch.int32))

        ref, got = layer(), layer()
        ref_out = pool_decode_torch(case["q"], k_new, v_new, ref, rows, case["scale"])
        got_out = pool_decode_triton(case["q"], k_new, v_new, got, rows, case["scale"])
        for name in ("k", "v", "pos", "spill_k", "spill_v", "spill_pos", "victim"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), (name, B, H, Hkv, D)
        torch.testing.assert_close(got.stat, ref.stat, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.lse, ref.lse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.vsum, ref.vsum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_out, ref_out, rtol=1e-5, atol=1e-5)
        full, n_slots = rows.after_write()
        assert full.any() and (got.victim[n_slots >= budget] >= 0).any() and (got.victim[n_slots < budget] == -1).all()
        assert int(got.victim[1, 0]) >= 0  # the edge case above has its victim
        n += 1
    return n


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, str(Path(__file__).parent))
    from test_pool_attention import check_victims, fresh, make_case, set_modes

    n = _check_attention(make_case, check_victims, fresh, set_modes) + _check_decode(make_case)
    print(f"{n} kernel cases match")


if __name__ == "__main__":
    main()
