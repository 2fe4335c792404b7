"""grid.png: every cell an image, the squarest layout that fits, no black filler cells."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adsa_core.images import grid_shape, make_grid

H, W, PAD = 6, 5, 2


def images(n: int) -> torch.Tensor:
    """n distinct images, none of them black anywhere (pixel values 1..255)."""
    g = torch.Generator().manual_seed(n)
    return torch.randint(1, 256, (n, H, W, 3), generator=g, dtype=torch.uint8)


def squarest_exact(n: int) -> tuple[int, int]:
    """Brute force: the factor pair rows x cols = n (rows <= cols) with the smallest difference."""
    return min(((r, n // r) for r in range(1, n + 1) if n % r == 0 and r <= n // r), key=lambda rc: rc[1] - rc[0])


@pytest.mark.parametrize("n", range(1, 130))
def test_grid_shape_fills_exactly_unless_that_is_a_long_strip(n):
    rows, cols = grid_shape(n)
    exact = squarest_exact(n)
    if exact[1] <= 8 or exact[1] <= 2 * exact[0]:
        assert (rows, cols) == exact
    else:  # e.g. 11, 13, 22: near-square, only the last row short, never a whole empty row
        assert cols == math.ceil(math.sqrt(n)) and (rows - 1) * cols < n < rows * cols
    assert cols >= rows


def test_grid_shape_examples():
    assert [grid_shape(n) for n in (1, 3, 4, 5, 8, 11, 12, 16, 22, 100)] == [
        (1, 1), (1, 3), (2, 2), (1, 5), (2, 4), (3, 4), (3, 4), (4, 4), (5, 5), (10, 10)
    ]
    with pytest.raises(ValueError):
        grid_shape(0)


def cells(grid: np.ndarray, rows: int, cols: int, last_shift: int) -> list[np.ndarray]:
    """The H x W cell windows of a grid image, row by row (the last row shifted right by last_shift)."""
    out = []
    for r in range(rows):
        for c in range(cols):
            y = PAD + r * (H + PAD)
            x = PAD + c * (W + PAD) + (last_shift if r == rows - 1 else 0)
            if x + W <= grid.shape[1]:
                out.append(grid[y : y + H, x : x + W])
    return out


@pytest.mark.parametrize("n", [1, 3, 4, 6, 9, 12])
def test_a_full_grid_is_rgb_with_every_image_in_order(n):
    rows, cols = grid_shape(n)
    px = images(n)
    img = make_grid(px, padding=PAD)
    assert img.mode == "RGB" and img.size == (PAD + cols * (W + PAD), PAD + rows * (H + PAD))
    got = cells(np.asarray(img), rows, cols, 0)
    assert len(got) == n
    for i in range(n):
        assert np.array_equal(got[i], px[i].numpy()), i


def test_a_short_last_row_is_centred_on_a_transparent_canvas():
    n = 11  # 3 rows of 4: the last holds 3, half a cell in from each side
    px = images(n)
    img = make_grid(px, padding=PAD)
    assert img.mode == "RGBA" and img.size == (PAD + 4 * (W + PAD), PAD + 3 * (H + PAD))
    grid = np.asarray(img)
    shift = (W + PAD) // 2
    full, last = cells(grid, 3, 4, 0)[:8], cells(grid, 3, 4, shift)[8:11]
    for i, cell in enumerate(full + last):
        assert np.array_equal(cell[..., :3], px[i].numpy()) and (cell[..., 3] == 255).all(), i
    # the only transparent pixels: beside the last row, outside its images and their gaps
    last_y = PAD + 2 * (H + PAD)
    expected = np.zeros(grid.shape[:2], bool)
    expected[last_y:, :shift] = True
    expected[last_y:, shift + PAD + 3 * (W + PAD) :] = True
    assert np.array_equal(grid[..., 3] == 0, expected)
    # and no opaque black cell anywhere: every opaque cell-sized window at a cell position is an image
    opaque_black = [c for c in cells(grid, 3, 4, 0) + cells(grid, 3, 4, shift) if (c[..., 3] == 255).all()
                    and (c[..., :3] == 0).all()]
    assert opaque_black == []
