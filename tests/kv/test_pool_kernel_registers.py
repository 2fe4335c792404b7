"""tools/pool_kernel_registers.py compiles the pool kernel for sm_90 without a GPU and reads its resource use:
the numbers come from ptxas, and a register cap must show up in them (fewer registers, more programs per SM)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


def test_a_register_cap_fits_more_programs_on_an_sm():
    from pool_kernel_registers import resources

    free = resources(fp8=True, write=True, block_n=16, warps=1)
    assert 64 < free["registers"] <= 255 and free["spilled"] == 0
    cap = max(64, (free["registers"] - 40) // 8 * 8)
    capped = resources(fp8=True, write=True, block_n=16, warps=1, maxnreg=cap)
    assert capped["registers"] <= cap and capped["programs"] > free["programs"]
    assert free["programs"] == 65536 // (-(-free["registers"] * 32 // 256) * 256)  # one warp, under 32 blocks
