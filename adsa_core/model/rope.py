"""2-D rotary position embedding over the image-token grid, as in LlamaGen.

Condition tokens get an all-zero table row (cos = sin = 0): LlamaGen multiplies their
queries and keys by zero, so they are attended with score 0 but still contribute their
values. Reproducing that quirk is what makes official checkpoints compute the same function.
"""

from __future__ import annotations

import torch


def precompute_freqs_cis_2d(
    grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1
) -> torch.Tensor:
    """Rotation table, shape (cls_token_num + grid_size**2, head_dim // 2, 2) of (cos, sin)."""
    half_dim = head_dim // 2  # one half of each head rotates with the row, the other with the column
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: half_dim // 2].float() / half_dim))
    t = torch.arange(grid_size, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (G, head_dim // 4)
    freqs_grid = torch.cat(
        [freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (G, G, head_dim // 2): row frequencies then column frequencies
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1).flatten(0, 1)  # (G*G, hd/2, 2)
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2), cache])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); freqs_cis: (B, T, D/2, 2) or (T, D/2, 2). Computed in fp32 like LlamaGen."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    if freqs_cis.dim() == 3:
        freqs_cis = freqs_cis.unsqueeze(0)
    f = freqs_cis.unsqueeze(2)  # (B|1, T, 1, D/2, 2)
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)
