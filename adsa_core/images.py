"""Decoded images -> uint8 pixels, PNG files and grids (LlamaGen's conversion)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8 on the CPU.

    As LlamaGen: clamp to [-1, 1], then 127.5 * x + 128 truncated, i.e. (x + 1) * 127.5 rounded.
    """
    x = images.detach().float().clamp(-1.0, 1.0)
    x = (127.5 * x + 128.0).clamp(0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", torch.uint8)  # (B, H, W, 3)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, H, W, 3) uint8 -> PIL images."""
    return [Image.fromarray(p.numpy()) for p in pixels]


def png_bytes(image: Image.Image, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def make_grid(pixels: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """(B, H, W, 3) uint8 -> one image, `nrow` per row (default: a square-ish grid), black gaps."""
    B, H, W, C = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = torch.zeros(padding + ncol * (H + padding), padding + nrow * (W + padding), C, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[y: y + H, x: x + W] = pixels[i]
    return Image.fromarray(grid.numpy())


def save_pngs(pixels: torch.Tensor, out_dir: str | Path, start: int = 0) -> list[Path]:
    """Write 00000.png, 00001.png, ... (numbered from `start`) into `out_dir`; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_pil(pixels), start=start):
        path = out_dir / f"{i:05d}.png"
        img.save(path)
        paths.append(path)
    return paths
