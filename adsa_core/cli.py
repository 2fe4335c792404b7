"""adsa-generate: offline batch generation with LlamaGen models.

    adsa-generate --gpt-model GPT-XL --image-size 384 --gpt-ckpt c2i_XL_384.pt --vq-ckpt vq_ds16_c2i.pt \\
        --class-labels 207,360,387 --cfg-scale 4 --seed 0 --out samples/
    adsa-generate --codes-in codes.json --vq-ckpt vq_ds16_c2i.pt --images-out images.pt   # decode only

The argparse namespace stays in this file: `main` turns it into a ModelSpec, SamplingParams,
CacheConfig and a few plain values, and everything below works on those.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import reference
from .argtypes import positive_int
from .cli_common import (
    DTYPE_CHOICES,
    Parser,
    UsageError,
    add_model_args,
    budget_arg,
    int_list,
    model_spec_from_args,
    run_main,
)
from .config import SEED_END, CacheConfig, ConfigError, VQConfig
from .engine.offline import run_offline
from .images import make_grid, save_pngs, to_uint8
from .kv.policy import policy_names
from .kv.pool import KV_CACHE_DTYPES
from .loading import LoadedModels, ModelSpec, load_models, read_json_arg, resolve_device, resolve_dtype
from .model.checkpoint import load_vq
from .model.vq import VQModel
from .sampling import SamplingParams

PROG = "adsa-generate"


# ---------------------------------------------------------------------------------------------
# What main() hands down instead of the argparse namespace


@dataclass(frozen=True)
class Conditions:
    """What the user asked to condition on; exactly one is set (checked against the model later)."""

    class_labels: list[int] | None = None
    prompts: list[str] | None = None
    caption_features: str | None = None  # torch file with "caption" (B, 120, C) and "emb_masks" (B, 120)


@dataclass(frozen=True)
class Outputs:
    out_dir: str | None = None  # 00000.png, 00001.png, ... and grid.png
    codes_out: str | None = None  # {"codes": [[...]], "stats": {...}}
    images_out: str | None = None  # float images in [-1, 1], (B, 3, H, W), torch.save

    @property
    def needs_pixels(self) -> bool:
        return bool(self.out_dir or self.images_out)


@dataclass
class Generated:
    """Codes plus the KV-cache accounting of the run (summed or maxed over all images)."""

    codes: torch.Tensor  # (N, block_size) int64, request order
    policy: str  # the policy that actually ran
    kv_budget_tokens: int  # slots per sequence per layer per head
    peak_kv_tokens: int  # most tokens one sequence held in any layer/head
    evictions: int
    spilled_bytes: int


# ---------------------------------------------------------------------------------------------
# Generation and decoding (no argparse below this line)


def generate_codes(
    models: LoadedModels,
    conds: torch.Tensor,
    emb_masks: torch.Tensor | None,
    sampling: SamplingParams,
    seeds: torch.Tensor,
    cache_config: CacheConfig,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    kv_cache_dtype: str = "auto",
) -> Generated:
    """Image tokens for every condition, `batch_size` images at a time. The only caller of a sampler:
    the dense reference (the oracle) for `dense`, the engine's sparse pooled cache otherwise.

    conds: labels (N,) or caption features (N, 120, C); seeds: (N,), image i uses seeds[i], so the
    result does not depend on `batch_size`. `progress(n)` is called with n new tokens. An fp8 KV cache
    (`kv_cache_dtype`) lives in the engine too, whatever the policy.
    """
    resolved = cache_config.resolve(models.gpt_config)
    if resolved.policy != "dense" or kv_cache_dtype != "auto":  # the pooled cache lives in the engine
        res = run_offline(models, conds, sampling, seeds, cache_config, batch_size, emb_masks=emb_masks,
                          progress=progress, kv_cache_dtype=kv_cache_dtype)
        return Generated(res.codes.cpu(), resolved.policy, resolved.budget,
                         max(st.peak_kv_tokens for st in res.stats), sum(st.evictions for st in res.stats),
                         sum(st.spilled_bytes for st in res.stats))
    chunks = []
    for start in range(0, len(seeds), batch_size):
        sl = slice(start, start + batch_size)
        n = len(seeds[sl])
        on_token = None if progress is None else (lambda _i, n=n: progress(n))
        masks = None if emb_masks is None else emb_masks[sl]
        codes = reference.generate(models.gpt, conds[sl], sampling, seeds=seeds[sl], emb_masks=masks,
                                   on_token=on_token)
        chunks.append(codes.cpu())
    return Generated(torch.cat(chunks), "dense", resolved.budget, resolved.seq_len, 0, 0)


@torch.no_grad()
def decode_images(vq: VQModel, codes: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """codes (N, h*w) -> float32 CPU images (n, 3, H, W) in [-1, 1] (unclamped), `batch_size` at a time."""
    device = next(vq.parameters()).device
    for start in range(0, codes.shape[0], batch_size):
        yield vq.decode_code(codes[start: start + batch_size].to(device)).float().cpu()


def progress_bar(total: int, unit: str, desc: str, delay: float | None) -> tqdm:
    """A bar on stderr. delay: None hides it; else it appears once the work has run `delay` seconds,
    so quick runs stay quiet and long ones show how far they are."""
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=delay is None, delay=delay or 0.0,
                dynamic_ncols=True)


def report_written(path: Path | str) -> None:
    """Each file the command writes, one per line on stdout as it is written (around any live bar)."""
    tqdm.write(str(path), file=sys.stdout)


def write_images(
    vq: VQModel, codes: torch.Tensor, outputs: Outputs, batch_size: int, progress_delay: float | None = None
) -> None:
    """PNGs + grid and/or the float image tensor, in request order; each file is reported."""
    floats: list[torch.Tensor] = []
    pixels: list[torch.Tensor] = []
    with progress_bar(codes.shape[0], "img", f"{PROG} decode", progress_delay) as bar:
        for images in decode_images(vq, codes, batch_size):
            if outputs.images_out:
                floats.append(images)
            if outputs.out_dir:
                px = to_uint8(images)
                for path in save_pngs(px, outputs.out_dir, start=sum(len(p) for p in pixels)):
                    report_written(path)
                pixels.append(px)
            bar.update(len(images))
    if outputs.out_dir:
        grid = Path(outputs.out_dir) / "grid.png"
        make_grid(torch.cat(pixels)).save(grid)
        report_written(grid)
    if outputs.images_out:
        path = Path(outputs.images_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.cat(floats), path)
        report_written(path)


def build_conditions(
    models: LoadedModels, conditions: Conditions, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels (N,) or caption features (N, 120, C) with masks (N, 120), checked against the model."""
    cfg, name = models.gpt_config, models.name
    if cfg.model_type == "c2i":
        if conditions.prompts is not None or conditions.caption_features is not None:
            raise ConfigError(f"{name} is class-conditional: use --class-labels, "
                              "not --prompts/--caption-features")
        if models.text_encoder is not None:
            raise ConfigError(f"{name} is class-conditional: --text-encoder does not apply")
        if conditions.class_labels is None:
            raise ConfigError("no condition: give --class-labels (e.g. --class-labels 1,7,3)")
        for label in conditions.class_labels:
            if not 0 <= label < cfg.num_classes:
                raise ConfigError(f"class label {label} is out of range 0..{cfg.num_classes - 1}")
        return torch.tensor(conditions.class_labels, dtype=torch.long), None

    if conditions.class_labels is not None:
        raise ConfigError(f"{name} is text-conditional: use --prompts with --text-encoder, "
                          "or --caption-features")
    if conditions.prompts is not None:
        encoder = models.text_encoder
        if encoder is None:
            raise ConfigError("--prompts needs --text-encoder DIR (a local T5 encoder, e.g. flan-t5-xl)")
        if encoder.dim != cfg.caption_dim:
            raise ConfigError(f"text encoder width {encoder.dim} does not match the model's caption_dim "
                              f"{cfg.caption_dim}")
        parts = [encoder.encode(conditions.prompts[i: i + batch_size])
                 for i in range(0, len(conditions.prompts), batch_size)]
        return torch.cat([c for c, _ in parts]), torch.cat([m for _, m in parts])
    if conditions.caption_features is not None:
        return read_caption_features(conditions.caption_features, cfg.cls_token_num, cfg.caption_dim)
    raise ConfigError("no condition: give --prompts with --text-encoder, or --caption-features")


def read_caption_features(path: str, tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--caption-features file not found: {path}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is one clear line
        raise ConfigError(f"cannot read --caption-features {path}: {e}") from None
    if not isinstance(obj, dict) or not torch.is_tensor(obj.get("caption")) or not torch.is_tensor(
        obj.get("emb_masks")
    ):
        raise ConfigError(f"--caption-features {path} must hold tensors 'caption' and 'emb_masks'")
    caption, masks = obj["caption"], obj["emb_masks"]
    if caption.dim() != 3 or tuple(caption.shape[1:]) != (tokens, dim):
        raise ConfigError(f"--caption-features caption has shape {tuple(caption.shape)}, "
                          f"the model needs (B, {tokens}, {dim})")
    if tuple(masks.shape) != (caption.shape[0], tokens):
        raise ConfigError(f"--caption-features emb_masks has shape {tuple(masks.shape)}, "
                          f"expected ({caption.shape[0]}, {tokens})")
    return caption.float(), masks


def read_codes(path: str) -> torch.Tensor:
    """{"codes": [[...], ...]} -> (N, h*w) int64."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--codes-in file not found: {path}")
    try:
        rows = json.loads(p.read_text())["codes"]
        codes = torch.tensor(rows, dtype=torch.long)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--codes-in {path} must be JSON with \"codes\": a list of equal-length integer "
                          f"lists ({type(e).__name__}: {e})") from None
    if codes.dim() != 2 or codes.numel() == 0:
        raise ConfigError(f"--codes-in {path}: codes must be a non-empty list of lists, got shape "
                          f"{tuple(codes.shape)}")
    return codes


def load_decoder(spec: ModelSpec) -> VQModel:
    """The VQ decoder alone (decode-only mode): --vq-ckpt/--vq-config, or the demo model's."""
    if spec.is_demo:
        models = load_models(spec)
        assert models.vq is not None
        return models.vq
    if spec.vq_ckpt is None:
        raise ConfigError("--codes-in needs --vq-ckpt (and --vq-config unless it is VQ-16)")
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    cfg = VQConfig.from_dict(read_json_arg(spec.vq_config, "--vq-config")) if spec.vq_config else VQConfig()
    return load_vq(cfg, spec.vq_ckpt, device, dtype)


def check_codes(codes: torch.Tensor, vq: VQModel) -> None:
    n = vq.config.codebook_size
    bad = codes[(codes < 0) | (codes >= n)]
    if bad.numel():
        raise ConfigError(f"code {int(bad[0])} is outside the VQ codebook 0..{n - 1}")
    side = round(codes.shape[1] ** 0.5)
    if side * side != codes.shape[1]:
        raise ConfigError(f"{codes.shape[1]} codes per image do not form a square grid")


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Generate images with a LlamaGen model (dense reference sampler).")
    add_model_args(p)

    c = p.add_argument_group("conditions")
    cond = c.add_mutually_exclusive_group()
    cond.add_argument("--class-labels", type=int_list, metavar="L,L,...",
                      help="comma-separated labels, one image each: 1,7,3")
    cond.add_argument("--prompts", nargs="+", metavar="TEXT",
                      help="text prompts, one image each (needs --text-encoder)")
    cond.add_argument("--caption-features", metavar="FILE",
                      help="torch file: 'caption' (B,120,D), 'emb_masks' (B,120)")
    c.add_argument("--text-encoder", metavar="DIR", help="local T5 encoder directory (e.g. flan-t5-xl)")
    c.add_argument("--list-classes", action="store_true", help="print the model's classes as JSON and exit")

    s = p.add_argument_group("sampling (defaults: LlamaGen's, or the demo model's)")
    s.add_argument("--cfg-scale", type=float, help="classifier-free guidance (default 4.0; 1.0 = off)")
    s.add_argument("--cfg-interval", type=int, help="CFG only for image tokens 0..N+1 (default -1: all)")
    s.add_argument("--temperature", type=float, help="default 1.0")
    s.add_argument("--top-k", type=int, help="default 0 (off)")
    s.add_argument("--top-p", type=float, help="default 1.0 (off)")
    s.add_argument("--greedy", action="store_true", default=None, help="arg-max decoding")
    s.add_argument("--seed", type=int, default=0, help="image i gets seed SEED+i (default 0)")
    s.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default 16)")
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on cuda, fp32 on cpu")

    k = p.add_argument_group("KV cache")
    k.add_argument("--policy", choices=policy_names(), default="dense",
                   help="default dense (the reference sampler, the exact images); the others run in the engine "
                        "(the server's default is line)")
    k.add_argument("--kv-budget", type=budget_arg, default=CacheConfig().budget, metavar="N|F",
                   help="slots per sequence: tokens (256), a fraction (0.5, 1/4) or none (default 0.5)")
    k.add_argument("--kv-prefix", type=int, metavar="N",
                   help="never-evicted first positions (default: condition tokens + up to one image row, by budget)")
    k.add_argument("--kv-local", type=int, metavar="M",
                   help="never-evicted recent positions (default: two image rows + 1, one row + 1 at small budgets)")
    k.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="K/V storage: auto (the model's dtype) or fp8 (e4m3: half the KV memory; runs in the engine)")

    o = p.add_argument_group("outputs")
    o.add_argument("--out", metavar="DIR", help="directory for 00000.png, 00001.png, ... and grid.png")
    o.add_argument("--codes-out", metavar="FILE", help='JSON: {"codes": [[...], ...], "stats": {...}}')
    o.add_argument("--images-out", metavar="FILE", help="torch file: float images (B, 3, H, W), unclamped")
    o.add_argument("--codes-in", metavar="FILE", help="decode only: codes JSON from --codes-out")
    o.add_argument("--progress", action="store_true", help="progress bar on stderr even when not a TTY")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)

    # Everything below uses these, never `a`.
    spec = model_spec_from_args(a)
    conditions = Conditions(a.class_labels, a.prompts, a.caption_features)
    outputs = Outputs(a.out, a.codes_out, a.images_out)
    sampling_overrides = {
        k: v for k, v in dict(cfg_scale=a.cfg_scale, cfg_interval=a.cfg_interval, temperature=a.temperature,
                              top_k=a.top_k, top_p=a.top_p, greedy=a.greedy).items() if v is not None
    }
    SamplingParams(**sampling_overrides)  # fail fast on bad values, before loading any weights
    cache_config = CacheConfig(policy=a.policy, budget=a.kv_budget, prefix=a.kv_prefix, local=a.kv_local)
    # --progress: a bar at once; on a terminal: a bar for work that runs over a second; else none
    progress_delay = 0.0 if a.progress else 1.0 if sys.stderr.isatty() else None

    if a.list_classes:
        return list_classes(spec)
    if a.codes_in:
        if a.class_labels or a.prompts or a.caption_features:
            raise UsageError("--codes-in decodes given codes; it takes no conditions")
        if not outputs.needs_pixels:
            raise UsageError("--codes-in needs --out or --images-out")
        return decode_only(spec, a.codes_in, outputs, a.batch_size, progress_delay)
    if a.prompts is not None and not a.text_encoder:
        raise UsageError("--prompts needs --text-encoder DIR (a local T5 encoder, e.g. flan-t5-xl)")
    if not (outputs.out_dir or outputs.codes_out or outputs.images_out):
        raise UsageError("nothing to write: give --out, --codes-out and/or --images-out")
    return generate(spec, conditions, sampling_overrides, cache_config, outputs, a.seed, a.batch_size,
                    progress_delay, a.kv_cache_dtype)


def list_classes(spec: ModelSpec) -> int:
    models = load_models(spec)
    cfg = models.gpt_config
    if cfg.model_type != "c2i":
        raise ConfigError(f"{models.name} is text-conditional; it has no classes")
    classes = models.classes or [{"id": i, "name": None, "emoji": None} for i in range(cfg.num_classes)]
    rows = [{"id": c["id"], "name": c.get("name"), "emoji": c.get("emoji")} for c in classes]
    print(json.dumps(rows, ensure_ascii=False))
    return 0


def decode_only(
    spec: ModelSpec, codes_in: str, outputs: Outputs, batch_size: int, progress_delay: float | None = None
) -> int:
    codes = read_codes(codes_in)
    vq = load_decoder(spec)
    check_codes(codes, vq)
    write_images(vq, codes, outputs, batch_size, progress_delay)
    return 0


def generate(
    spec: ModelSpec,
    conditions: Conditions,
    sampling_overrides: dict,
    cache_config: CacheConfig,
    outputs: Outputs,
    seed: int,
    batch_size: int,
    progress_delay: float | None,
    kv_cache_dtype: str = "auto",
) -> int:
    """Generate, then write `outputs`; progress_delay: see `progress_bar`."""
    models = load_models(spec)
    cache_config.resolve(models.gpt_config)  # invalid budget for this model: fail before any work
    if outputs.needs_pixels and models.vq is None:
        raise ConfigError("--out and --images-out need a VQ decoder: give --vq-ckpt")
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    defaults = {k: v for k, v in models.sampling_defaults.items() if k in known}
    sampling = SamplingParams(**{**defaults, **sampling_overrides})
    conds, emb_masks = build_conditions(models, conditions, batch_size)
    n = conds.shape[0]
    if not 0 <= seed <= SEED_END - n:
        raise UsageError(f"--seed must be in [0, {SEED_END - n}] for {n} images: image i uses seed + i, a signed "
                         "64-bit integer")
    seeds = seed + torch.arange(n, dtype=torch.long)

    bar = progress_bar(n * models.gpt_config.block_size, "tok", PROG, progress_delay)

    def advance(tokens: int) -> None:
        bar.update(tokens)

    t0 = time.perf_counter()
    with bar:
        result = generate_codes(models, conds, emb_masks, sampling, seeds, cache_config, batch_size,
                                advance, kv_cache_dtype)
    seconds = time.perf_counter() - t0

    stats = {
        "model": models.name,
        "model_type": models.gpt_config.model_type,
        "image_size": models.image_size,
        "n_images": n,
        "seeds": seeds.tolist(),
        **({"class_labels": conditions.class_labels} if conditions.class_labels is not None else {}),
        **({"prompts": conditions.prompts} if conditions.prompts is not None else {}),
        "sampling": dataclasses.asdict(sampling),
        "policy": result.policy,
        "requested_policy": cache_config.policy,
        "kv_cache_dtype": kv_cache_dtype,
        "kv_budget_tokens": result.kv_budget_tokens,
        "peak_kv_tokens": result.peak_kv_tokens,
        "evictions": result.evictions,
        "spilled_bytes": result.spilled_bytes,
        "batch_size": batch_size,
        "device": str(models.device),
        "dtype": str(models.dtype).removeprefix("torch."),
        "seconds": round(seconds, 4),
        "images_per_s": round(n / seconds, 4) if seconds > 0 else None,
    }
    if outputs.codes_out:
        path = Path(outputs.codes_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"codes": result.codes.tolist(), "stats": stats}) + "\n")
        report_written(path)
    if outputs.needs_pixels:
        assert models.vq is not None
        write_images(models.vq, result.codes, outputs, batch_size, progress_delay)
    if progress_delay is not None:
        print(f"{PROG}: {n} images in {seconds:.2f} s ({n / seconds:.2f} images/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
