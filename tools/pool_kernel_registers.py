"""Registers, spills and block-loop length of the pool kernel for sm_90, compiled offline: no GPU needed.

Triton compiles the kernel for a Hopper target with the argument specialisation a real launch at GPT-XL's shapes
gets (pointers and 16-divisible strides marked so), and the cuobjdump Triton ships reports its resource use. An
SM holds 64K registers (4 x 16K) and at most 32 blocks, so registers decide how many (kv head, row) programs run
at once, and with them how many K/V bytes are in flight (docs/PERFORMANCE.md, run 22). The loop's instructions a
block say how much a warp issues per block of K/V bytes (run 23). Judge speed on the GPU; this says why.

    python3 tools/pool_kernel_registers.py            # GPT-XL's launches: fp8 and bf16, with and without the write,
                                                      # eager and conditional rescale
    python3 tools/pool_kernel_registers.py --maxnreg 128,104
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adsa_core.kv.kernels import pool_attention as pa  # noqa: E402

# GPT-XL: H = 20 and 37 pages, not multiples of 16
NOT_16 = {"stride_lb", "stride_bt", "stride_xb", "n_pages"}


def warps_per_sm(registers: int) -> int:
    """Warps an SM can hold at this many registers a thread, as CUDA's occupancy calculator counts: registers
    are allocated per warp in units of 256, from 4 sub-partitions of 16K each (a warp lives in one)."""
    per_warp = -(-registers * 32 // 256) * 256
    return 16384 // per_warp * 4


@functools.cache
def resources(fp8: bool, write: bool, block_n: int, warps: int, maxnreg: int | None = None,
              lazy_rescale: bool = False, ahead: int = 0) -> dict:
    """{"registers", "spilled" (bytes a thread), "programs" (per SM), "loop_instructions"} of one launch of the
    kernel for GPT-XL."""
    fn = pa._pool_attention_kernel
    params = list(inspect.signature(fn.fn).parameters)
    kv = "*fp8e4nv" if fp8 else "*bf16"
    types = {"q_ptr": "*bf16", "out_ptr": "*bf16", "knew_ptr": "*bf16", "vnew_ptr": "*bf16", "position_ptr": "*i64",
             "inv_ptr": "*fp32", "vsum_ptr": "*fp32", "lse_ptr": "*fp32", "k_ptr": kv, "v_ptr": kv, "spk_ptr": kv,
             "spv_ptr": kv, "qk_scale": "fp32"}
    const = dict(HKV=20, PAGE=16, D=64, D_PAD=64, G=1, G_PAD=1, BLOCK_N=block_n, DOT_PRECISION="tf32",
                 MAX_PAGES=64, WRITE=write, FP8=fp8, LAZY_RESCALE=lazy_rescale, PDL=False, EARLY=False,
                 AHEAD=ahead, **pa.POLICY_CONSTANTS)
    const = {k: v for k, v in const.items() if k in params}
    sig = {p: "constexpr" if p in const else types.get(p, "*i32" if p.endswith("_ptr") else "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if sig[p] != "constexpr" and p != "qk_scale" and p not in NOT_16}
    src = ASTSource(fn, sig, {(params.index(k),): v for k, v in const.items()}, attrs)
    options = {"num_warps": warps, "num_stages": 2, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage, sass = (subprocess.run([str(cuobjdump), flag, f.name], capture_output=True, text=True).stdout
                       for flag in ("-res-usage", "-sass"))
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    programs = min(32, warps_per_sm(regs) // warps)  # and at most 32 blocks an SM
    return {"registers": regs, "spilled": stack, "programs": programs, "loop_instructions": loop_instructions(sass)}


def loop_instructions(sass: str) -> int:
    """Instructions in the kernel's block loop (both sides of its branches): the span of the widest branch back
    to an earlier address. A one-warp program issues about this many instructions a block; with fp8 the K/V
    bytes of a block are too few to hide them (docs/PERFORMANCE.md, run 23)."""
    branches = re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA (?:0x)?([0-9a-f]+)", sass)
    spans = [int(m[1], 16) - int(m[2], 16) for m in branches]
    loops = [s for s in spans if s > 0]  # a branch to itself (the kernel's closing trap) is no loop
    if not loops:
        raise ValueError("no backward branch in the SASS: the kernel has no loop, or cuobjdump's format changed")
    return max(loops) // 16 + 1  # sm_90 instructions are 16 bytes; the branch itself counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", default="16x1,8x1,64x2", help="BLOCK_N x warps, comma separated")
    ap.add_argument("--maxnreg", default="", help="register caps to add, comma separated")
    ap.add_argument("--ahead", default="0,1", help="blocks prefetched ahead into L2 (AHEAD), comma separated")
    a = ap.parse_args()
    caps = [None, *(int(c) for c in a.maxnreg.split(",") if c)]
    print(f"Triton {triton.__version__}, sm_90")
    for launch in a.launches.split(","):
        block_n, warps = (int(x) for x in launch.split("x"))
        for fp8 in (True, False):
            for write, lazy, cap, ahead in itertools.product((True, False), (False, True), caps,
                                                             [int(x) for x in a.ahead.split(",")]):
                name = (f"{launch:5s} {'fp8 ' if fp8 else 'bf16'} {'write' if write else 'read '} "
                        f"{'conditional' if lazy else 'eager'} rescale, ahead {ahead}, cap {cap or '-'}")
                r = resources(fp8, write, block_n, warps, cap, lazy, ahead)
                print(f"{name:56s} {r['registers']:3d} registers, {r['spilled']:3d} B spilled, "
                      f"{r['programs']:2d} programs ({r['programs'] * warps} warps) per SM, "
                      f"{r['loop_instructions']} instructions a block", flush=True)


if __name__ == "__main__":
    main()
