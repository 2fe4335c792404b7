"""fp8 matmuls for the transformer blocks (`ModelSpec.matmul_dtype="fp8"`): e4m3 weights and activations with
row-wise scales, multiplied by `torch._scaled_mm` (products summed in full precision, then scaled back).

Each weight row (an output channel) and each token's activations are scaled so that their largest magnitude
is e4m3's 448, then rounded: a scale per row keeps one outlier from flattening the others. Weights are
rounded once at load, activations on every call. The embeddings and the output head stay in the model's
dtype. What it costs in quality on the demo model: docs/FIDELITY.md, "fp8 matmuls".
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (e4m3 (M, K), fp32 scales (M, 1)) with x ~= e4m3 * scale, row by row."""
    scale = (x.abs().amax(-1, keepdim=True).float() / E4M3_MAX).clamp_min(1e-12)
    return (x.float() / scale).to(E4M3), scale


class Fp8Linear(nn.Module):
    """A bias-free linear layer y = x W^T in fp8: W (N, K) rounded per output channel, x per token."""

    weight: torch.Tensor  # (N, K) e4m3, row-major: its transpose is the column-major mat2 _scaled_mm wants
    scale: torch.Tensor  # (1, N) fp32: W ~= weight * scale.T

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.is_cuda and any(d % 16 for d in weight.shape):  # cuBLASLt's fp8 GEMM: K and N multiples of 16
            raise ConfigError(f"fp8 matmuls on a GPU need dimensions that are multiples of 16: {tuple(weight.shape)}")
        w8, scale = fp8_rows(weight.detach())
        self.register_buffer("weight", w8)
        self.register_buffer("scale", scale.reshape(1, -1))
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8, x_scale = fp8_rows(x.reshape(-1, self.in_features))  # (M, K), (M, 1)
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.scale, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def quantize_matmuls(gpt: nn.Module) -> None:
    """Every matmul of the transformer blocks (wqkv, wo, the fused w1/w3, w2) in fp8, in place; the original
    weights are freed."""
    for block in gpt.layers:  # type: ignore[union-attr]
        att, ff = block.attention, block.feed_forward
        att.wqkv, att.wo = Fp8Linear(att.wqkv.weight), Fp8Linear(att.wo.weight)
        ff.fuse()  # one (2 * hidden, dim) matmul for w1 and w3
        ff.w13 = Fp8Linear(ff.w13)  # replaces the fused buffer; FeedForward calls it
        for name in ("w1", "w3"):  # their weights were views of the fused one: keep no copy of it
            setattr(ff, name, None)
        ff.w2 = Fp8Linear(ff.w2.weight)
