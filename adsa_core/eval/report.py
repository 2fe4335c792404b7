"""What adsa-fidelity writes: the grid of images (rows = settings) and the markdown tables of its JSON report,
with the notes that say which model, weights, images and device the numbers belong to."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..loading import DEMO_DIR, ModelSpec


def round_sig(x: float | None, digits: int = 6) -> float | None:
    """`digits` significant digits for the JSON; None for NaN and infinities (JSON has neither)."""
    if x is None or math.isnan(x) or math.isinf(x):
        return None
    return float(f"{x:.{digits}g}")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def save_grid(grids: dict[str, torch.Tensor], col_labels: list[str], path: Path, pad: int = 2) -> Image.Image:
    """Rows = settings (label at the left), columns = images (label on top)."""
    first = next(iter(grids.values()))
    n, H, W, _ = first.shape
    scale = 1 if H >= 64 else math.ceil(64 / H)  # tiny test images: upscale so labels fit
    H, W = H * scale, W * scale
    font = _font(max(10, min(14, W // 9)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda t: int(probe.textlength(t, font=font))
    left = 8 + max(text_w(lbl) for lbl in grids)
    top = 20
    img = Image.new("RGB", (left + n * (W + pad) + pad, top + len(grids) * (H + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    for c, lbl in enumerate(col_labels[:n]):
        while lbl and text_w(lbl) > W:
            lbl = lbl[:-1]
        draw.text((left + pad + c * (W + pad), 3), lbl, fill="black", font=font)
    for r, (lbl, px) in enumerate(grids.items()):
        y = top + pad + r * (H + pad)
        draw.text((4, y + H // 2 - 7), lbl, fill="black", font=font)
        for c in range(px.shape[0]):
            tile = Image.fromarray(px[c].numpy())
            if scale > 1:
                tile = tile.resize((W, H), Image.Resampling.NEAREST)
            img.paste(tile, (left + pad + c * (W + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def _fmt(x, spec: str = ".4f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def _fmt_fid(x: float | None) -> str:
    return _fmt(x, ".2f" if x is not None and x >= 10 else ".3f")


def _pm(x: float | None, se: float | None, spec: str = ".3f") -> str:
    """x ± se (the standard error), or x alone when se is unknown."""
    if x is None:
        return "–"
    return f"{x:{spec}} ± {se:{spec}}" if se is not None else format(x, spec)


def _signed_pm(x: float | None, se: float | None) -> str:
    return "–" if x is None else (f"{x:+.3f} ± {se:.3f}" if se is not None else f"{x:+.3f}")


def markdown_table(report: dict) -> str:
    head = (
        "| policy | budget (fraction / tokens) | n | m | KL(dense‖policy) | top-1 agree | NLL | recognition acc "
        "| Δ recognition vs dense | FID | FID to dense | token agree vs dense | PSNR vs dense (dB) "
        "| peak KV tokens | KV bytes vs dense |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in report["rows"]:
        dense = r["policy"] == "dense"
        lines.append(
            " | ".join(
                [
                    f"| {r['policy']}",
                    f"{r['budget_fraction']:.3f} / {r['budget_tokens']}",
                    "–" if dense else str(r["prefix"]),
                    str(r["local"]) if r["policy"] not in ("dense", "window") else "–",
                    _fmt(r["kl"]),
                    _fmt(r["top1_agree"], ".3f"),
                    _fmt(r["nll"], ".3f"),
                    _pm(r.get("recognition_acc"), r.get("recognition_se")),
                    "–" if dense else _signed_pm(r.get("recognition_delta"), r.get("recognition_delta_se")),
                    _fmt_fid(r.get("fid")),
                    _fmt_fid(r.get("fid_to_dense")),
                    _fmt(r["token_agree"], ".3f"),
                    "∞" if r.get("pixel_mse") == 0 else _fmt(r.get("psnr_db"), ".2f"),
                    str(r["peak_kv_tokens"]),
                    _fmt(r["kv_bytes_ratio"], ".3f"),
                ]
            )
            + " |"
        )
    notes = [
        "",
        *_run_notes(report),
        "n = prefix (never-evicted first positions, condition token included), m = local window (window keeps "
        "the prefix and the most recent budget - n tokens: m does not change it). "
        "KL, top-1 agreement and NLL are teacher-forced on the dense samples (mean per token); NLL of dense "
        f"itself: {_fmt(report['rows'][0]['nll'], '.3f')}. Token agreement, PSNR, recognition and FID are "
        "free-running with the same seeds. Recognition: ± its binomial standard error; Δ vs dense: the paired "
        "difference over the same images ± its standard error.",
    ]
    notes += [f"Note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines + notes) + "\n"


def sampling_markdown(report: dict) -> str:
    head = "| sampling | recognition acc | FID | seed diversity (pixel RMSE) | seed token overlap |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in report["rows"]:
        label = r["label"] + (" (default)" if r.get("is_default") else "")
        lines.append(
            " | ".join(
                [
                    f"| {label}",
                    _pm(r.get("recognition_acc"), r.get("recognition_se")),
                    _fmt_fid(r.get("fid")),
                    _fmt(r.get("seed_diversity"), ".4f"),
                    _fmt(r.get("seed_token_overlap"), ".3f"),
                ]
            )
            + " |"
        )
    notes = [
        "",
        *_run_notes(report),
        "Every candidate samples the same (class, seed) images with the dense cache. Recognition ± its binomial "
        "standard error. Seed diversity: mean pixel RMSE between two seeds of one class (0: one template); "
        "seed token overlap: fraction of equal tokens between them (1: identical images).",
    ]
    notes += [f"Note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines + notes) + "\n"


def _run_notes(meta: dict) -> list[str]:
    return [
        f"Model `{meta['model']}` (GPT weights sha256 {meta.get('gpt_ckpt_sha256') or '–'}; {meta['image_size']} px, "
        f"{meta['block_size']} image tokens, sequence {meta['seq_len']} KV tokens), {meta['n_images']} images: "
        f"classes {_short(meta['classes'])} x {meta['seeds_per_class']} seeds from seed {meta['first_seed']}; "
        f"sampling {meta['sampling']}.",
        f"Device: {meta['device']}; dtype {meta['dtype']}; {meta['date']}; {meta['seconds']} s.",
        f"FID features: {meta.get('features') or '–'}; reference: {meta.get('reference') or '–'}.",
    ]


def gpt_weights_sha256(spec: ModelSpec, limit: int = 1 << 30) -> str | None:
    """First 16 hex digits of the GPT checkpoint's SHA-256 (which weights the numbers belong to); None without a
    checkpoint file or past `limit` bytes."""
    if spec.is_demo:
        path: Path | None = DEMO_DIR / json.loads((DEMO_DIR / "config.json").read_text())["gpt_ckpt"]
    else:
        path = Path(spec.gpt_ckpt) if spec.gpt_ckpt else None
    if path is None or not path.is_file() or path.stat().st_size > limit:
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _short(xs: list[int]) -> str:
    return str(xs) if len(xs) <= 12 else f"[{', '.join(map(str, xs[:10]))}, ... ({len(xs)} classes)]"
