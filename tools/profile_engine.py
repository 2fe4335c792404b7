"""Profile engine decode steps on the GPU: where the time of one step goes (kernels and host), each part
beside its floor on this card (attention: the K/V bytes at copy bandwidth; matmuls: their FLOPs at the dense
bf16 peak or their weight read, whichever is longer; the VQ decode of the batch's images spread over a step).

    python tools/profile_engine.py --preset GPT-XL --image-size 384 --batch 64 --policy adsa --budget 0.25

--serving drives the engine as a busy server does instead of one wave: arrivals staggered so that about
batch / 576 images end per step, each replaced at once, images VQ-decoded by the image stage. It prints the
host's time per step beside the device's (is the loop host-bound?) and a Python profile of the host loop
(from Python 3.12 on, cProfile records every thread: the image stage's calls appear beside the loop's).
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from adsa_core.config import CacheConfig, EngineConfig, GPTConfig, VQConfig, gpt_preset
from adsa_core.engine import Engine, GenerationRequest
from adsa_core.engine.request import Finished
from adsa_core.engine.step_clock import StepTiming
from adsa_core.eval.bench import fp8_matmuls, random_models
from adsa_core.kv.pool import KV_CACHE_DTYPES
from adsa_core.loading import MATMUL_DTYPES
from adsa_core.model.llamagen import SkinnyLinear
from adsa_core.sampling import SamplingParams

# kernel name fragments -> the part of a step they belong to (first match wins)
PARTS = (
    ("pool attention", ("pool_",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "splitkreduce", "_skinny_kernel")),
    ("sampling", ("topk", "sort", "scan", "radix", "searchsorted", "sample", "gather", "index", "cumsum")),
    ("fused elementwise (Inductor)", ("triton_",)),
)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def print_by_part(prof: profile, steps: int, floors: dict[str, tuple[float, str]],
                  parts: tuple[tuple[str, tuple[str, ...]], ...] = PARTS, per: str = "step", top: int = 3) -> None:
    """GPU time per `per` (a step; `steps` of them profiled) by part, from the profiler's kernel events, each part
    named by the first of `parts` whose name fragments its kernel's name holds, beside the part's floor."""
    by_part: dict[str, float] = {}
    kernels: dict[str, int] = {}  # launches per part: at small batches their count, not their bytes, sets the time
    largest: dict[str, list[tuple[float, int, str]]] = {}  # per part: (us, launches, kernel name)
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if ev.device_type.name != "CUDA" or not us:  # kernels only, not the CPU-side ops that launched them
            continue
        name = ev.key.lower()
        part = next((p for p, keys in parts if any(k in name for k in keys)), "other")
        by_part[part] = by_part.get(part, 0.0) + us
        kernels[part] = kernels.get(part, 0) + ev.count
        largest.setdefault(part, []).append((us, ev.count, ev.key))
    total = sum(by_part.values()) or 1.0  # no kernel events: a CPU smoke run
    print(f"GPU time per {per} by part (of {total / steps / 1000:.2f} ms, {sum(kernels.values()) / steps:.0f} "
          f"kernels), floor per {per}:")
    for part, us in sorted(by_part.items(), key=lambda kv: -kv[1]):
        ms = us / steps / 1000
        floor, why = floors.get(part, (0.0, ""))
        at = f"floor {floor:6.3f} ms ({100 * floor / ms:5.1f} % of it: {why})" if floor else ""
        print(f"  {part:32s} {ms:6.3f} ms  {100 * us / total:5.1f} %  {kernels[part] / steps:5.0f} kernels  {at}")
        for k_us, count, name in sorted(largest[part], reverse=True)[:top]:  # what the part is made of
            print(f"      {k_us / steps / 1000:6.3f} ms  {count / steps:4.0f} x  {name[:90]}")


def step_floors(cfg: GPTConfig, gpt: nn.Module, rows: int, slots: int, kv_item: int, copy_tbs: float,
                peak_tflops: float, hbm_tbs: float) -> dict[str, tuple[float, str]]:
    """Lower bounds (ms) of a decode step's parts: `rows` sequences holding `slots` K/V slots each."""
    # per slot, layer and head: K and V, plus the pool's position (int32) and 1/|v| (fp32)
    kv_bytes = rows * slots * cfg.n_layer * cfg.kv_heads * (2 * cfg.head_dim * kv_item + 8)
    weights = [m.weight for m in gpt.modules() if isinstance(m, (nn.Linear, SkinnyLinear))]
    flops = 2 * rows * sum(w.numel() for w in weights)
    w_bytes = sum(w.numel() * w.element_size() for w in weights)
    mm_flop_ms, mm_read_ms = flops / peak_tflops / 1e9, w_bytes / hbm_tbs / 1e9
    return {
        "pool attention": (kv_bytes / copy_tbs / 1e9,
                           f"{kv_bytes / 1e9:.2f} GB of K/V at {copy_tbs} TB/s, {rows} rows x {slots} slots"),
        "matmul": (max(mm_flop_ms, mm_read_ms), f"{flops / 1e12:.2f} TFLOP at {peak_tflops} TFLOP/s = "
                   f"{mm_flop_ms:.3f} ms; weights {w_bytes / 1e9:.2f} GB at {hbm_tbs} TB/s = {mm_read_ms:.3f} ms"),
    }


def vq_decode_per_image(models, images: int, peak_tflops: float) -> tuple[float, float]:
    """Eager VQ decode time per image (ms, a chunk of `images`) and its FLOP floor per image (ms)."""
    side = models.image_size // 16
    assert models.vq is not None and models.vq_config is not None
    codes = torch.randint(0, models.vq_config.codebook_size, (images, side * side), device=models.device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            models.vq.decode_code(codes[:1])
        for _ in range(2):
            models.vq.decode_code(codes)
        sync(models.device)
        t0 = time.perf_counter()
        for _ in range(3):
            models.vq.decode_code(codes)
        sync(models.device)
    return 1000 * (time.perf_counter() - t0) / (3 * images), fc.get_total_flops() / peak_tflops / 1e9


def label(cfg: GPTConfig, n: int) -> int:
    """Image n's class label: labels repeat past num_classes images (batch 1024 of a 1000-class model)."""
    return n % (cfg.num_classes if cfg.model_type == "c2i" else 1)


class ServingLoad:
    """A busy server's load: in flight min(batch, arrivals so far), arrivals at batch / block_size per step from the
    first step on (so the images' ends are spread out as a server's are), each finished image replaced."""

    def __init__(self, eng: Engine, sp: SamplingParams, batch: int):
        self.eng, self.sp, self.batch = eng, sp, batch
        self.steps = 0  # since the load began
        self.submitted = 0
        self.finished = 0

    def _sink(self, ev: object) -> None:
        self.finished += isinstance(ev, Finished)

    def run(self, steps: int) -> None:
        cfg = self.eng.cfg
        for _ in range(steps):
            self.steps += 1
            want = min(self.batch, math.ceil(self.steps * self.batch / cfg.block_size))
            while len(self.eng.requests) < want:
                n = self.submitted = self.submitted + 1
                self.eng.submit(GenerationRequest(condition=label(cfg, n), seed=n, sampling=self.sp), self._sink)
            self.eng.step()


def profile_serving(eng: Engine, sp: SamplingParams, batch: int, steps: int, dev: torch.device) -> None:
    """Host vs device time per step in a served steady state, then where the host's time goes."""
    print(f"graphs captured before serving: {eng.capture_graphs()}")
    eng.images.warm_up(eng.cfg.block_size)  # the VQ decoder's compile, as the server's warm-up: not in the timing
    load = ServingLoad(eng, sp, batch)
    load.run(eng.cfg.block_size + 50)  # past the first images' ends: a full, staggered batch
    timings: list[StepTiming] = []
    eng.step_listeners.append(timings.append)
    host0, steps0, done0, t0 = eng.stats_.host_busy_s_total, eng.stats_.steps_total, load.finished, time.perf_counter()
    load.run(steps)
    sync(dev)
    wall = time.perf_counter() - t0
    done = load.finished - done0
    host = (eng.stats_.host_busy_s_total - host0) / steps
    n = max(1, len(timings))
    device = sum(t.device_s for t in timings) / n
    period = sum(t.period_s for t in timings) / n
    print(f"serving, batch {batch}, {steps} steps ({eng.stats_.steps_total - steps0} decode steps): "
          f"{done} images ({done / wall:.2f} img/s), host {1000 * host:.2f} ms per step, device "
          f"{1000 * device:.2f} ms per step, period {1000 * period:.2f} ms, "
          f"device busy {device / max(period, 1e-9):.2f}")
    prof = cProfile.Profile()
    prof.enable()
    load.run(min(steps, 50))
    prof.disable()
    sync(dev)
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats(25)


def config_override(text: str) -> tuple[str, int]:
    """'n_layer=2' -> ('n_layer', 2), for --override."""
    field, _, value = text.partition("=")
    if not field or not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"expected FIELD=INT, got {text!r}")
    return field, int(value)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="GPT-XL")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--policy", default="dense")
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument("--matmul-dtype", default="auto", choices=MATMUL_DTYPES,
                   help="fp8: the blocks' matmuls in e4m3 (floors stay those of the model's own weights)")
    p.add_argument("--warm-steps", type=int, default=300, help="steps before timing (past an adsa budget)")
    p.add_argument("--copy-tbs", type=float, default=4.0, help="the card's measured copy bandwidth, TB/s")
    p.add_argument("--hbm-tbs", type=float, default=4.8, help="the card's peak memory bandwidth (weight read), TB/s")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 matmul peak, TFLOP/s")
    p.add_argument("--top-kernels", type=int, default=3, help="kernels listed under each part, largest first")
    p.add_argument("--vq-images", type=int, default=16, help="images per VQ decode timed for its share of a step")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the tool (no kernel times)")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=INT", type=config_override,
                   help="a GPTConfig field, e.g. n_layer=2 (a small model: the host loop at full batch on a CPU)")
    p.add_argument("--serving", action="store_true", help="a busy server's staggered load: host vs device per step")
    a = p.parse_args()
    dev = torch.device(a.device)
    cfg = gpt_preset(a.preset, a.image_size, **dict(a.override))
    models = random_models(cfg, VQConfig(), a.preset, a.image_size, dev,
                           torch.bfloat16 if dev.type == "cuda" else torch.float32)
    weights = models.gpt  # the floors' weights: the model's own, whatever the matmuls run in
    if a.matmul_dtype == "fp8":
        models = fp8_matmuls(models)
    eng = Engine(models, EngineConfig(max_batch_size=a.batch, max_queue=max(256, a.batch),
                                      cuda_graphs=not a.no_graphs,
                                      compile_step=a.compile, kv_cache_dtype=a.kv_cache_dtype,
                                      # the CPU's VQ decode of a full-size image takes seconds: a CPU run
                                      # profiles the loop without it
                                      decode_images=dev.type == "cuda",
                                      default_cache=CacheConfig(policy=a.policy, budget=a.budget)))
    sp = SamplingParams(cfg_scale=4.0, top_k=2000)
    if a.serving:
        try:
            profile_serving(eng, sp, a.batch, a.steps, dev)
        finally:
            eng.close()
        return
    for i in range(a.batch):
        eng.submit(GenerationRequest(condition=label(cfg, i), seed=i, sampling=sp), lambda ev: None)
    for _ in range(a.warm_steps):  # into the steady state (past the budget, graphs captured)
        eng.step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        eng.step()
    t_host = time.perf_counter() - t0
    sync(dev)
    t_all = time.perf_counter() - t0
    print(f"per step: host issue {1000 * t_host / a.steps:.2f} ms, wall {1000 * t_all / a.steps:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            eng.step()
        sync(dev)
    rows = 2 * a.batch  # CFG: a conditional and an unconditional sequence per image
    resident = min(CacheConfig(policy=a.policy, budget=a.budget).resolve(cfg).budget,
                   cfg.cls_token_num + a.warm_steps + a.steps + 2)  # slots a row holds in the profiled steps
    floors = step_floors(cfg, weights, rows, resident, 1 if a.kv_cache_dtype == "fp8" else 2, a.copy_tbs,
                         a.peak_tflops, a.hbm_tbs)
    print_by_part(prof, 5, floors, top=a.top_kernels)
    vq_ms, vq_floor = vq_decode_per_image(models, a.vq_images, a.peak_tflops)
    share = a.batch / cfg.block_size  # images finished per step in steady serving
    print(f"VQ decode (not in the steps above; eager, chunks of {a.vq_images}): {vq_ms:.3f} ms per image, FLOP floor "
          f"{vq_floor:.3f} ms; per step of {a.batch} images: {share * vq_ms:.3f} ms (floor {share * vq_floor:.3f})")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
