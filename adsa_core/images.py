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
    return uint8_pixels(images).cpu()


def uint8_pixels(images: torch.Tensor) -> torch.Tensor:
    """`to_uint8` on the images' own device (the engine copies them to pinned memory itself)."""
    x = images.detach().float().clamp(-1.0, 1.0)
    x = (127.5 * x + 128.0).clamp(0, 255)
    return x.permute(0, 2, 3, 1).to(torch.uint8)  # (B, H, W, 3)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, H, W, 3) uint8 -> PIL images."""
    return [Image.fromarray(p.numpy()) for p in pixels]


def png_bytes(image: Image.Image, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) for n images: the squarest layout that n fills exactly, unless that is a long
    strip (over 8 columns and over twice as wide as high: 11, 13, 22 ...); then ceil(sqrt(n))
    columns with a shorter last row."""
    if n < 1:
        raise ValueError("a grid needs at least one image")
    square = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    cols = next(d for d in range(square, n + 1) if n % d == 0)
    rows = n // cols
    if cols <= 8 or cols <= 2 * rows:
        return rows, cols
    return math.ceil(n / square), square


def make_grid(pixels: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """(B, H, W, 3) uint8 -> one image, `nrow` per row (default: `grid_shape`), 2-pixel black gaps.

    Every cell holds an image: a shorter last row is centred and the canvas beside it is transparent
    (an RGBA image then), never a black filler cell."""
    B, H, W, C = pixels.shape
    cols = nrow or grid_shape(B)[1]
    rows = math.ceil(B / cols)
    last = B - (rows - 1) * cols  # images in the last row
    channels = C if last == cols else C + 1  # alpha only where part of the canvas stays empty
    grid = torch.zeros(padding + rows * (H + padding), padding + cols * (W + padding), channels, dtype=torch.uint8)
    shift = (cols - last) * (W + padding) // 2  # of the last row, to centre it
    last_y = padding + (rows - 1) * (H + padding)
    if channels > C:  # opaque: the full rows, then the last row's images with the gaps around them
        grid[:last_y, :, C] = 255
        grid[last_y:, shift : shift + padding + last * (W + padding), C] = 255
    for i in range(B):
        r, c = divmod(i, cols)
        y, x = padding + r * (H + padding), padding + c * (W + padding) + (shift if r == rows - 1 else 0)
        grid[y : y + H, x : x + W, :C] = pixels[i]
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
