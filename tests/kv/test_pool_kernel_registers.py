"""tools/pool_kernel_registers.py compiles the pool kernel for sm_90 without a GPU and reads its resource use and
its block loop's length: the numbers come from ptxas, and a register cap must show up in them (fewer registers,
more programs per SM), and a wider block in the loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


def test_warps_per_sm_as_the_occupancy_calculator_counts():
    from pool_kernel_registers import warps_per_sm

    # 4 sub-partitions of 16K registers, 256-register units a warp: 163 -> 168 x 32 = 5376 a warp, 3 a sub-partition
    assert [warps_per_sm(r) for r in (64, 80, 96, 104, 108, 128, 163, 231, 255)] == [32, 24, 20, 16, 16, 16, 12, 8, 8]


def test_a_register_cap_fits_more_programs_on_an_sm():
    from pool_kernel_registers import resources

    free = resources(fp8=True, write=True, block_n=16, warps=1)
    assert 64 < free["registers"] <= 255 and free["spilled"] == 0
    cap = 64  # 32 warps an SM: one-warp programs reach the 32-block limit
    capped = resources(fp8=True, write=True, block_n=16, warps=1, maxnreg=cap)
    assert capped["registers"] <= cap and capped["programs"] == 32 > free["programs"]


def test_the_loop_is_the_widest_backward_branch():
    from pool_kernel_registers import loop_instructions

    sass = """
        /*0040*/                   MOV R1, c[0x0][0x28] ;
        /*0050*/               @P0 BRA 0x90 ;
        /*0060*/                   FFMA R2, R3, R4, R2 ;
        /*0070*/              @!P1 BRA 0x60 ;
        /*0080*/                   FADD R2, R2, R5 ;
        /*0090*/             @!UP0 BRA 0x40 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
    """
    assert loop_instructions(sass) == 6  # 0x40 .. 0x90: the inner loop (0x60 .. 0x70) and the self-branch are not it
    with pytest.raises(ValueError, match="no backward branch"):
        loop_instructions(sass.replace("@!UP0 BRA 0x40", "NOP").replace("@!P1 BRA 0x60", "NOP"))


def test_the_block_loop_grows_with_the_block():
    from pool_kernel_registers import resources

    # each slot of a block costs its conversions and multiply-adds: twice the slots, about twice the loop
    eight, sixteen = (resources(fp8=True, write=True, block_n=n, warps=1)["loop_instructions"] for n in (8, 16))
    assert eight > 100 and 1.5 * eight < sixteen < 2.5 * eight


def test_the_conditional_rescale_frees_registers():
    from pool_kernel_registers import resources

    # the accumulator's rescale moves into a rarely taken branch: its live values leave the loop's common path
    # (Triton 3.6, runs 23-24: 163 -> 128 registers, 12 -> 16 programs an SM, and the kernel 14.5 % faster)
    eager, lazy = (resources(fp8=True, write=True, block_n=16, warps=1, lazy_rescale=z) for z in (False, True))
    assert lazy["registers"] < eager["registers"] and lazy["programs"] >= eager["programs"]


def test_the_l2_prefetch_holds_no_extra_registers():
    from pool_kernel_registers import resources

    # the large-grid fp8 launch prefetches its next block (AHEAD = 1) at the occupancy it had without: a prefetch's
    # only cost is its few instructions a block (run 31: the write launch 151 -> 138 µs at 1024 rows x 144 slots)
    plain, ahead = (resources(fp8=True, write=True, block_n=16, warps=1, lazy_rescale=True, ahead=a) for a in (0, 1))
    assert ahead["programs"] == plain["programs"] == 16 and ahead["spilled"] == 0
    assert plain["loop_instructions"] < ahead["loop_instructions"] < 1.15 * plain["loop_instructions"]
