"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A step at batch 1 is ~360 small kernels in one CUDA graph, and between two of them the GPU idles while the next
one launches. Under PDL a kernel may start once every program of the kernel before it has signalled; it waits
(`griddepcontrol.wait`) before it reads what that kernel wrote.

Our kernels call `pdl_enter` before reading anything a recent kernel may have written: wait for the kernel
before, then signal the next. Signalling only after the wait keeps completion transitive: when a kernel
starts, every kernel two or more before it has finished. Inductor's kernels take part too
(`inductor_options`); alone they made the step slower, with ours the step at batch 1 went 1.56 -> 1.51 ms
in one call (run 29). `ADSA_PDL=0` turns it all off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# PDL only for steps of at most this many rows (batch 8 with CFG). Run 29: batch 1 1.56 -> 1.51 ms a step, batch 8
# unchanged (1.69 -> 1.70), batch 512 slower (10.71 -> 11.34 ms): there the pool kernel runs many waves, and the
# programs of the kernel after it hold SM slots while they wait.
MAX_ROWS = 16


@functools.cache
def _supported(device: torch.device) -> bool:
    return (os.environ.get("ADSA_PDL", "1") != "0" and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def use_pdl(device: torch.device, rows: int) -> bool:
    """Whether a step of `rows` rows on `device` launches with PDL: a GPU of compute capability 9 or later, at
    most MAX_ROWS rows, unless ADSA_PDL=0."""
    return rows <= MAX_ROWS and _supported(device)


def launch_options(device: torch.device, rows: int) -> dict:
    """A launch's keyword arguments: the kernel's PDL switch and, when on, Triton's launch attribute."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(device, rows) else {"PDL": False}


def inductor_options(device: torch.device) -> dict:
    """torch.compile options under which Inductor's kernels take part, where this torch can (2.9 and later);
    {} where they cannot."""
    if _supported(device) and hasattr(torch._inductor.config.triton, "enable_pdl"):
        return {"triton.enable_pdl": True}
    return {}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """prefetch.global.L2 of the 128-byte line holding each pointer: data a kernel will read is on its way from
    HBM without holding registers, before its PDL wait (the kernel before it still finishing) or a block ahead of
    its loads (pool_attention's large-grid loop)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs.to(tl.int64)],
                              dtype=tl.int32, is_pure=False, pack=1)
