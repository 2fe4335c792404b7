"""adsa-bench: throughput and memory of the engine against the compiled reference sampler.

In one process, per (preset, image size, batch): the project's reference sampler with its
decode step compiled (the baseline; it reproduces the public LlamaGen sampler), the engine
with `dense`, and the engine with sparse policies at budget fractions. Random weights, CFG
on, VQ-16 decode included in images/s (as in the public anchor numbers). Writes JSON and a
markdown table.

    adsa-bench --presets GPT-XL --image-sizes 384 --batches 64,128 --out bench/
    adsa-bench --smoke --device cpu --out /tmp/bench     # tiny, seconds, same JSON fields
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import reference
from ..argtypes import non_negative_float, positive_int
from ..config import CacheConfig, ConfigError, EngineConfig, GPTConfig, VQConfig, gpt_preset, parse_budget
from ..engine import Engine, Finished, GenerationRequest
from ..engine.imaging import VQ_AUTOTUNE_MODE
from ..kv.policy import policy_names
from ..kv.pool import KV_CACHE_DTYPES, pages_for
from ..loading import LoadedModels, check_matmul_dtype, resolve_device, resolve_dtype
from ..model.checkpoint import load_gpt, load_vq
from ..model.fp8 import quantize_matmuls
from ..reference import generate
from ..sampling import SamplingParams


@dataclass
class Row:
    model: str
    size: int
    policy: str  # "reference" (compiled baseline) or a KV policy name (dense, adsa, window, line)
    budget: float | None  # fraction of the sequence; None = whole
    batch: int
    img_per_s: float
    tok_per_s: float
    peak_memory_bytes: int
    kv_bytes: int  # KV cache bytes reserved for the run
    step_ms: float  # mean time per generated token position
    seconds: float
    card: str
    ratio_to_baseline: float | None = None
    note: str = ""
    kv_cache_dtype: str = "auto"  # engine rows: "fp8" stores K/V in e4m3 (the reference keeps the model's)
    matmul_dtype: str = "auto"  # engine rows: "fp8" runs the blocks' matmuls in e4m3 (the reference keeps the model's)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()  # engines of earlier rows hold graphs and pools until collected
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def bench_reference(models: LoadedModels, batch: int, sampling: SamplingParams, compiled: bool) -> Row:
    """LlamaGen-style: all tokens for the batch with a static dense cache, then one VQ decode of the batch."""
    dev, cfg = models.device, models.gpt_config
    labels = torch.arange(batch, device=dev) % cfg.num_classes
    seeds = torch.arange(batch, device=dev)
    assert models.vq is not None, "the benchmark times the VQ decode too"
    # warm-up outside the timing: the compile for this batch shape (eager: allocator and kernels), and one
    # VQ decode of the batch (else the first row of a process pays cuDNN's and the lazy kernel loading's start)
    codes = generate(models.gpt, labels, sampling, seeds=seeds, compile_step=compiled)
    with torch.no_grad():
        models.vq.decode_code(codes)
    del codes
    _sync(dev)
    _reset_peak(dev)
    t0 = time.perf_counter()
    codes = generate(models.gpt, labels, sampling, seeds=seeds, compile_step=compiled)
    _sync(dev)
    t_gen = time.perf_counter() - t0
    with torch.no_grad():
        images = models.vq.decode_code(codes)  # the whole batch at once, as the public sampler does
        images.clamp(-1, 1)
    _sync(dev)
    total = time.perf_counter() - t0
    reference.release_static_caches()  # its KV must not count towards the next row's peak
    kv = 2 * batch * (cfg.cls_token_num + cfg.block_size) * cfg.kv_bytes_per_token(models.gpt.dtype.itemsize)
    return Row(models.name, models.image_size, "reference", None, batch, batch / total,
               batch * cfg.block_size / total, _peak(dev), kv, 1000 * t_gen / cfg.block_size, total,
               card_name(dev), note="compiled" if compiled else "eager")


def bench_engine(models: LoadedModels, batch: int, sampling: SamplingParams, policy: str,
                 budget: float | None, graphs: bool, spill_limit: int, compile_step: bool = False,
                 waves: int = 3, kv_cache_dtype: str = "auto", vq_chunk: int = 16, vq_autotune: bool = False) -> Row:
    """`waves` x `batch` requests submitted at once to an engine running at most `batch` at a time:
    serving throughput, where each wave's VQ decode overlaps the next wave's tokens (only the
    last wave's decode is exposed). The KV pool holds exactly what one wave needs."""
    dev, cfg = models.device, models.gpt_config
    cache = CacheConfig(policy=policy, budget=budget)
    resolved = cache.resolve(cfg)
    page = 16
    rows = 2 * batch if sampling.uses_cfg else batch
    pool_tokens = rows * pages_for(resolved.budget, page) * page  # exactly what the batch needs
    ec = EngineConfig(max_batch_size=batch, kv_pool_tokens=pool_tokens, page_size=page,
                      max_queue=(waves + 1) * batch, spill_limit_bytes=spill_limit, cuda_graphs=graphs,
                      compile_step=compile_step,
                      default_cache=cache,  # the engine decodes to pixels, like the baseline (no PNG)
                      vq_decode_batch=vq_chunk, vq_autotune=vq_autotune, kv_cache_dtype=kv_cache_dtype)
    _sync(dev)
    _reset_peak(dev)
    engine = Engine(models, ec)
    done: list[Finished] = []

    def wave(n: int, tag: str) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            engine.submit(GenerationRequest(condition=i % cfg.num_classes, seed=i, sampling=sampling,
                                            request_id=f"{tag}{i}"),
                          lambda ev: done.append(ev) if isinstance(ev, Finished) else None)
        while engine.has_work:  # until the image stage has handed out every image too
            engine.step()
        assert len(done) == n, f"{len(done)} of {n} images came back"
        _sync(dev)
        return time.perf_counter() - t0

    wave(batch, "warm")  # captures the CUDA graphs for every bucket this batch passes through
    done.clear()
    n = waves * batch
    total = wave(n, "run")
    kv = sum(f.stats.kv_bytes for f in done) // waves
    autotuned = engine.images.compile_mode == VQ_AUTOTUNE_MODE  # not on a CPU, nor without --compile
    engine.close()
    return Row(models.name, models.image_size, policy, budget, batch, n / total, n * cfg.block_size / total,
               _peak(dev), kv, 1000 * total / (waves * cfg.block_size), total, card_name(dev),
               note=f"{waves} waves" + ("" if kv_cache_dtype == "auto" else f", {kv_cache_dtype} KV")
               + (", VQ max-autotune" if autotuned else ""),
               kv_cache_dtype=kv_cache_dtype)


def random_models(cfg: GPTConfig, vq_cfg: VQConfig, name: str, image_size: int, device: torch.device,
                  dtype: torch.dtype) -> LoadedModels:
    torch.manual_seed(0)
    gpt = load_gpt(cfg, None, device, dtype)
    vq = load_vq(vq_cfg, None, device, dtype)
    return LoadedModels(name, gpt, vq, cfg, vq_cfg, image_size, device, dtype)


def fp8_matmuls(models: LoadedModels) -> LoadedModels:
    """The same weights with the blocks' matmuls in fp8, beside the original (which the reference row keeps)."""
    gpt = copy.deepcopy(models.gpt)
    quantize_matmuls(gpt)
    return dataclasses.replace(models, gpt=gpt)


def markdown(rows: list[Row]) -> str:
    head = "| model | size | policy | budget | batch | img/s | tok/s | peak GiB | KV GiB | ms/token | x baseline |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        b = "-" if r.budget is None else f"{r.budget:.3g}"
        ratio = "-" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}"
        lines.append(f"| {r.model} | {r.size} | {r.policy}{' (' + r.note + ')' if r.note else ''} | {b} | {r.batch} "
                     f"| {r.img_per_s:.2f} | {r.tok_per_s:.0f} | {r.peak_memory_bytes / 2**30:.2f} "
                     f"| {r.kv_bytes / 2**30:.2f} | {r.step_ms:.2f} | {ratio} |")
    return "\n".join(lines)


def _fractions(text: str) -> list[float]:
    """'1/2,0.25' -> [0.5, 0.25]: config.parse_budget's reading, fractions only (rows compare models of any length)."""
    out = []
    for item in (t for t in text.split(",") if t.strip()):
        try:
            value = parse_budget(item)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not isinstance(value, float):
            raise argparse.ArgumentTypeError(f"budget {item!r}: give a fraction of the sequence (0.25, 1/4)")
        out.append(value)
    return out


def _choices(text: str, known: tuple[str, ...], what: str) -> list[str]:
    """A comma list, each item one of `known` (ConfigError naming the flag otherwise)."""
    items = [t for t in text.split(",") if t]
    if unknown := [t for t in items if t not in known]:
        raise ConfigError(f"{what}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    return items


def _positive_ints(text: str, what: str) -> list[int]:
    """'64,128' -> [64, 128] ("" -> []), ConfigError naming the flag for anything but positive integers."""
    try:
        return [positive_int(t) for t in text.split(",") if t.strip()]
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{what}: {e}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _parser()
    a = p.parse_args(argv)
    try:
        _check(a)
    except ValueError as e:  # ConfigError among them; parse_dtype's own
        p.error(str(e))
    return a


def _check(a: argparse.Namespace) -> None:
    """Every mistake in the arguments before any model is built: one line from argparse, not a traceback
    minutes in. Converts the comma lists in place."""
    a.sampling = SamplingParams(cfg_scale=a.cfg_scale, top_k=a.top_k)  # its ValueError: a usage error
    cpu_asked = a.device == "cpu"
    a.device = resolve_device(a.device)
    if a.device.type == "cpu" and not a.smoke and not cpu_asked:
        raise ConfigError("no GPU: the presets need one (GPT-XL at batch 64 takes tens of GiB); use --smoke for "
                          "a tiny model on the CPU, or --device cpu to run a preset there anyway")
    a.dtype = resolve_dtype(a.dtype, a.device)
    given = {"--presets": a.presets, "--image-sizes": a.image_sizes, "--batches": a.batches,
             "--sparse-batches": a.sparse_batches, "--budgets": a.budgets}
    if a.smoke and (customised := [flag for flag, value in given.items() if value is not None]):
        raise ConfigError(f"--smoke runs its own tiny model at batch 2 and budget 1/2: drop {', '.join(customised)}")
    if a.vq_autotune and not a.compile:
        raise ConfigError("--vq-autotune tunes the compiled VQ decoder: add --compile")
    a.presets, a.image_sizes = a.presets or "GPT-XL", a.image_sizes or "384"
    a.batches = "64,128" if a.batches is None else a.batches
    a.budgets = [0.5, 0.25, 1 / 6] if a.budgets is None else a.budgets
    a.policies = _choices(a.policies, policy_names(), "--policies")
    a.batches = _positive_ints(a.batches, "--batches")  # "": sparse rows only
    a.sparse_batches = _positive_ints(a.sparse_batches, "--sparse-batches") if a.sparse_batches else a.batches
    a.kv_cache_dtypes = _choices(a.kv_cache_dtypes, KV_CACHE_DTYPES, "--kv-cache-dtypes")
    a.dense_kv_cache_dtypes = (a.kv_cache_dtypes if a.dense_kv_cache_dtypes is None
                               else _choices(a.dense_kv_cache_dtypes, KV_CACHE_DTYPES, "--dense-kv-cache-dtypes"))
    a.matmul_dtypes = [d for d in a.matmul_dtypes.split(",") if d]
    for d in a.matmul_dtypes:
        check_matmul_dtype(d, a.device, a.dtype)
    a.presets = [p for p in a.presets.split(",") if p]
    a.image_sizes = _positive_ints(a.image_sizes, "--image-sizes")
    if not a.smoke:
        for name in a.presets:
            for size in a.image_sizes:
                gpt_preset(name, size)  # an unknown preset, a size the VQ cannot make


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adsa-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", help="comma list of GPT presets (default GPT-XL)")
    p.add_argument("--image-sizes", help="comma list (default 384)")
    p.add_argument("--batches", help="comma list (default 64,128; empty: sparse rows only)")
    p.add_argument("--policies", default="line,adsa,window", help="sparse policies to run besides dense")
    p.add_argument("--budgets", type=_fractions,
                   help="budget fractions for the sparse policies, e.g. 1/2,0.25 (default 1/2,1/4,1/6)")
    p.add_argument("--sparse-batches", default=None, help="batches for sparse policies (default: --batches)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--device", default="auto", help="auto: cuda when available; cpu runs a preset on the CPU")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-reference", action="store_true", help="skip the compiled reference baseline")
    p.add_argument("--eager-reference", action="store_true", help="baseline without torch.compile")
    p.add_argument("--no-graphs", action="store_true", help="engine without CUDA graphs")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's decode step")
    p.add_argument("--waves", type=positive_int, default=3,
                   help="engine: requests = waves x batch, at most batch at once")
    p.add_argument("--spill-limit-mb", type=non_negative_float, default=16.0, help="per-sequence spill limit")
    p.add_argument("--kv-cache-dtypes", default="auto",
                   help="engine rows for each KV storage dtype: auto (the model's), fp8 (e4m3), or both: auto,fp8")
    p.add_argument("--dense-kv-cache-dtypes", default=None,
                   help="the same for the dense rows only (default: --kv-cache-dtypes)")
    p.add_argument("--matmul-dtypes", default="auto",
                   help="engine rows for each matmul dtype: auto (the model's), fp8 (experimental, docs/FIDELITY.md), "
                        "or both: auto,fp8; the reference row keeps the model's")
    p.add_argument("--vq-chunk", type=positive_int, default=16,
                   help="engine: images per VQ decode (a wave finishes together; compiled, 16 decodes an image in "
                        "~3/4 of the time of 8, tools/bench_vq_decode.py)")
    p.add_argument("--vq-autotune", action="store_true",
                   help="engine, with --compile: the VQ decoder under Inductor's max-autotune "
                        "(EngineConfig.vq_autotune; minutes of compile unless TORCHINDUCTOR_CACHE_DIR holds it)")
    p.add_argument("--smoke", action="store_true", help="tiny model, seconds, for CI")
    p.add_argument("--out", default="bench-out")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device, dtype = a.device, a.dtype
    sampling = a.sampling
    budgets, policies, batches, sparse_batches = a.budgets, a.policies, a.batches, a.sparse_batches
    kv_dtypes, dense_kv_dtypes = a.kv_cache_dtypes, a.dense_kv_cache_dtypes
    if a.smoke:
        setups = [("smoke", 32, GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=16, num_classes=10),
                   VQConfig(codebook_size=64, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2), z_channels=32,
                            ch=32))]
        batches, sparse_batches, budgets = [2], [2], [0.5]
    else:
        setups = [(name, size, gpt_preset(name, size), VQConfig()) for name in a.presets for size in a.image_sizes]
    rows: list[Row] = []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    spill = int(a.spill_limit_mb * 2**20)
    matmul_dtypes = a.matmul_dtypes
    for name, size, cfg, vq_cfg in setups:
        models = random_models(cfg, vq_cfg, name, size, device, dtype)
        by_matmul = {d: models if d == "auto" else fp8_matmuls(models) for d in matmul_dtypes}
        for batch in sorted(set(batches) | set(sparse_batches)):
            # (policy, budget, kv dtype, matmul dtype); "reference": the baseline
            runs: list[tuple[str, float | None, str, str]] = []
            if not a.no_reference and batch in batches:
                runs.append(("reference", None, "auto", "auto"))
            for mm in matmul_dtypes:
                if batch in batches:
                    runs += [("dense", None, kv, mm) for kv in dense_kv_dtypes]
                if batch in sparse_batches:
                    runs += [(pol, bud, kv, mm) for kv in kv_dtypes for pol in policies for bud in budgets]
            base = None
            for policy, budget, kv_dtype, mm in runs:
                try:
                    if policy == "reference":
                        row = bench_reference(models, batch, sampling, not a.eager_reference and device.type == "cuda")
                    else:
                        row = bench_engine(by_matmul[mm], batch, sampling, policy, budget, not a.no_graphs, spill,
                                           a.compile, a.waves, kv_dtype, a.vq_chunk, a.vq_autotune)
                        row.matmul_dtype = mm
                        row.note += ", fp8 matmuls" if mm == "fp8" else ""
                except torch.cuda.OutOfMemoryError as e:
                    print(f"OOM: {e}", file=sys.stderr)
                    torch.cuda.empty_cache()
                    continue
                if row.policy == "reference":
                    base = row
                row.ratio_to_baseline = row.img_per_s / base.img_per_s if base else None
                rows.append(row)
                print(f"{row.model} {row.size} {row.policy:9s} kv={row.kv_cache_dtype} budget={row.budget} "
                      f"batch={row.batch}: "
                      f"{row.img_per_s:.2f} img/s, peak {row.peak_memory_bytes / 2**30:.2f} GiB, "
                      f"kv {row.kv_bytes / 2**30:.2f} GiB, {row.step_ms:.2f} ms/token", file=sys.stderr, flush=True)
                (out / "bench.json").write_text(json.dumps(
                    {"card": card_name(device), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                     "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
                (out / "bench.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
