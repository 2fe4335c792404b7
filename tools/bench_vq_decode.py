"""VQ-16 decode speed and peak memory per chunk size and execution variant (GPU).

The engine decodes finished images in chunks on its own stream; that work shares the GPU with
token decoding, so its cost per image counts directly against images/s.

Variants: eager (NCHW), channels_last (eager, weights channels-last), cudnn_benchmark, compile
(torch.compile of decode_code, dynamic=False), compile_channels_last (a channels-last copy of the
model, its latents made channels-last at the first conv, then compiled the same way) and
compile_cudnn_benchmark (compile with cuDNN's autotuner) and compile_max_autotune (Inductor's
max-autotune: each conv the faster of cuDNN and Inductor's Triton templates, and its coordinate descent
over the launch parameters of the Triton kernels it writes) and compile_coordinate_descent (that descent
alone); compile_nchw (Inductor's layout optimisation off: NCHW throughout), compile_cooperative (its
cooperative reductions) and compile_channel_stats (each GroupNorm from per-channel statistics,
ChannelStatsGroupNorm). Before timing, each variant's images for the first chunk are compared with eager
NCHW's: the run stops if they are not the same images (--tol). --profile also prints one chunk's GPU time
per image by kind of kernel (docs/PERFORMANCE.md, run 35: about half convolutions, half Inductor's
GroupNorm, swish and upsample kernels).

    python tools/bench_vq_decode.py --image-size 384 --chunks 8,16 --out vq.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable

import torch
from profile_engine import print_by_part  # a sibling script: tools/ is on the path when run
from torch import nn
from torch.profiler import ProfilerActivity, profile

from adsa_core.config import VQConfig
from adsa_core.engine.imaging import VQ_AUTOTUNE_MODE, vq_decoder
from adsa_core.model.checkpoint import load_vq
from adsa_core.model.vq import VQModel

VARIANTS = ("eager", "channels_last", "cudnn_benchmark", "compile", "compile_channels_last", "compile_cudnn_benchmark",
            "compile_max_autotune", "compile_coordinate_descent", "compile_nchw", "compile_cooperative",
            "compile_channel_stats")
# kernel name fragments -> what a decode's GPU time is spent on (first match wins), for --profile
# Inductor's pointwise and reduction kernels come before the convolutions: their names list every op fused into
# them, a convolution's bias among them (before run 34 their GroupNorms were counted as convolutions)
KINDS = (
    ("layout copies", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("Inductor (GroupNorm, swish, adds, upsample)", ("triton_poi_", "triton_red_", "triton_per_")),
    ("convolutions and matmuls (cuDNN, cuBLAS, templates)",
     ("conv", "xmma", "cudnn", "sm90_", "cutlass", "implicit", "gemm", "nvjet", "triton_")),
)


def measure(fn, codes: torch.Tensor, chunk: int, reps: int) -> tuple[float, int]:
    """ms per image and peak bytes above the baseline, decoding `codes` in chunks."""
    for c in codes[: 2 * chunk].split(chunk):  # warm-up (and compile) on the timed shape
        fn(c)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(reps):
        for c in codes.split(chunk):
            fn(c)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t0) / (reps * len(codes))
    return ms, torch.cuda.max_memory_allocated() - base


def channels_last_decoder(vq: VQModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """decode_code of a copy of `vq` with its conv weights channels-last; the looked-up latents (the
    decode path's first 4-D tensor, NCHW-contiguous out of quantize.lookup) are made channels-last
    where they enter post_quant_conv, so no conv sees an NCHW activation."""
    cl = copy.deepcopy(vq).to(memory_format=torch.channels_last)
    cl.post_quant_conv.register_forward_pre_hook(
        lambda _module, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    )
    return cl.decode_code


class ChannelStatsGroupNorm(nn.GroupNorm):
    """nn.GroupNorm with its group statistics combined from per-channel ones: the same result (a test holds it
    to F.group_norm in float64) from a reduction that reads channels-last memory coalesced.

    Why: compiled, Inductor keeps the decoder's activations channels-last for cuDNN. A group's C/32 channels
    are then C apart in memory, and Inductor's GroupNorm kernels took 0.90 ms of a 1.86 ms decode an image,
    against 0.61 ms for the same graph kept NCHW, whose layout copies cost more (docs/PERFORMANCE.md run 35).
    Per-channel statistics reduce over H x W with the channels contiguous, and the law of total variance
    combines them exactly: var_g = mean_c(var_c) + mean_c((mean_c - mean_g)^2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, g = x.shape[0], x.shape[1], self.num_groups
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 activations: fp32 statistics, like torch's
        var_c, mean_c = torch.var_mean(xf, dim=tuple(range(2, x.dim())), correction=0)  # (n, c) each
        mean_c, var_c = mean_c.view(n, g, c // g), var_c.view(n, g, c // g)
        mean_g = mean_c.mean(-1, keepdim=True)  # (n, g, 1)
        rstd = torch.rsqrt((var_c + (mean_c - mean_g).square()).mean(-1, keepdim=True) + self.eps)
        scale = rstd * self.weight.to(xf.dtype).view(g, c // g)  # (n, g, c/g): x * scale + shift normalises
        shift = self.bias.to(xf.dtype).view(g, c // g) - mean_g * scale
        spatial = (1,) * (x.dim() - 2)
        return (xf * scale.view(n, c, *spatial) + shift.view(n, c, *spatial)).to(x.dtype)


def channel_stats_decoder(vq: VQModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """decode_code of a copy of `vq` whose GroupNorms are ChannelStatsGroupNorm (the same parameters)."""
    cs = copy.deepcopy(vq)
    for module in cs.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = ChannelStatsGroupNorm  # same attributes, another forward
    return cs.decode_code


def build(vq: VQModel, variant: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode function of a variant. channels_last converts `vq` in place (main converts it back)."""
    torch.backends.cudnn.benchmark = variant in ("cudnn_benchmark", "compile_cudnn_benchmark")
    # every compiled variant compiles the same function: past dynamo's recompile limit (8) one would run eager
    torch._dynamo.reset()
    if variant == "channels_last":
        vq.to(memory_format=torch.channels_last)
    if variant in ("compile", "compile_cudnn_benchmark", "compile_max_autotune"):  # the engine's own compile
        return vq_decoder(vq, VQ_AUTOTUNE_MODE if variant == "compile_max_autotune" else "default")
    if variant == "compile_channels_last":
        return torch.compile(channels_last_decoder(vq), dynamic=False)
    if variant == "compile_nchw":  # Inductor keeps NCHW: each GroupNorm group contiguous, the convs not channels-last
        return torch.compile(vq.decode_code, dynamic=False, options={"layout_optimization": False})
    if variant == "compile_cooperative":  # reductions split across thread blocks (Inductor's cooperative reductions)
        return torch.compile(vq.decode_code, dynamic=False, options={"triton.cooperative_reductions": True})
    if variant == "compile_channel_stats":
        return torch.compile(channel_stats_decoder(vq), dynamic=False)
    if variant == "compile_coordinate_descent":  # only the Triton kernels' launch parameters tuned (Inductor's)
        return torch.compile(vq.decode_code, dynamic=False, options={"coordinate_descent_tuning": True})
    return vq.decode_code


def print_profile(fn, codes: torch.Tensor, variant: str, chunk: int, top: int) -> None:
    """GPU time per image of one chunk's decode, by kind of kernel, and the `top` largest kernels of each kind."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(codes[:chunk])
        torch.cuda.synchronize()
    print(f"{variant}, chunk {chunk}:")
    print_by_part(prof, chunk, {}, parts=KINDS, per="image", top=top)


def same_images(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> tuple[float, float]:
    """(max, mean) |out - ref|; SystemExit unless the mean is <= tol and the max <= 10 tol.

    decode_code returns unclamped images on the [-1, 1] scale (random weights: |x| up to ~3, std ~0.3).
    bf16 rounding alone moves single pixels by ~0.1 (CPU, random VQ-16 weights: bf16 vs fp32 max 0.11,
    mean 0.009; eager channels-last vs NCHW max 0.11, mean 0.010), so a bound on the max alone would
    fail correct variants; a layout mix-up gives other images (mean ~0.3, max > 1)."""
    diff = (out.float() - ref.float()).abs()
    worst, mean = float(diff.max()), float(diff.mean())
    print(f"{what}: max |diff| {worst:.4f}, mean {mean:.5f} vs eager NCHW (|ref| <= {float(ref.abs().max()):.2f})",
          flush=True)
    if out.shape != ref.shape or not (mean <= tol and worst <= 10 * tol):
        raise SystemExit(f"{what}: not the same images as eager NCHW (shape {tuple(out.shape)} vs {tuple(ref.shape)}, "
                         f"max |diff| {worst:.4f}, mean {mean:.5f}; limits: mean {tol}, max {10 * tol})")
    return worst, mean


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--chunks", default="8,16")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tol", type=float, default=0.05,
                   help="largest mean |diff| from eager NCHW's images on the first chunk (the max may be 10x)")
    p.add_argument("--profile", action="store_true", help="also print each variant's GPU time by kind of kernel")
    p.add_argument("--profile-top", type=int, default=3, help="with --profile: the largest kernels listed per kind")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    variants = a.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        p.error(f"unknown variants {unknown}; known: {','.join(VARIANTS)}")
    chunks = [int(c) for c in a.chunks.split(",")]
    torch.manual_seed(0)
    cfg = VQConfig()
    vq = load_vq(cfg, None, "cuda", torch.bfloat16)
    grid = a.image_size // cfg.downsample
    codes = torch.randint(0, cfg.codebook_size, (a.images, grid * grid), device="cuda")
    torch.backends.cudnn.benchmark = False
    with torch.no_grad():
        ref = vq.decode_code(codes[: chunks[0]])  # eager NCHW: the images every variant must reproduce
    rows = []
    for variant in variants:
        fn = build(vq, variant)
        diff = {}
        if variant != "eager":
            with torch.no_grad():  # also the first compile, on the first timed shape
                worst, mean = same_images(fn(codes[: chunks[0]]), ref, a.tol, variant)
            diff = {"max_abs_diff": round(worst, 4), "mean_abs_diff": round(mean, 5)}
        for chunk in chunks:
            with torch.no_grad():
                ms, peak = measure(fn, codes, chunk, a.reps)
            rows.append({"variant": variant, "chunk": chunk, "ms_per_image": round(ms, 3),
                         "peak_mib": round(peak / 2**20, 1), **diff, "card": torch.cuda.get_device_name()})
            print(json.dumps(rows[-1]), flush=True)
            if a.profile:
                print_profile(fn, codes, variant, chunk, a.profile_top)
        if variant == "channels_last":
            vq.to(memory_format=torch.contiguous_format)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
