"""LlamaGen VQ tokenizer (VQ-16 and variants), with LlamaGen's parameter names.

Encoder/decoder: conv stacks with GroupNorm(32) and swish, self-attention at the lowest
resolution; the codebook is l2-normalised and looked up by nearest neighbour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQConfig


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).reshape(B, C, H * W).transpose(1, 2)
        v = self.v(h).reshape(B, C, H * W).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C); scale 1/sqrt(C) as LlamaGen
        return x + self.proj_out(out.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as LlamaGen (taming) does


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest interpolation in fp32 (bf16 interpolate is not supported everywhere)
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class _Level(nn.Module):
    """One resolution level; attribute names match LlamaGen's `conv_blocks.{i}`."""

    def __init__(self, block_in: int, block_out: int, n_res: int, with_attn: bool, resample: nn.Module | None,
                 resample_name: str):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_res):
            self.res.append(ResnetBlock(block_in, block_out))
            block_in = block_out
            if with_attn:
                self.attn.append(AttnBlock(block_out))
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[i](h)
        resample = getattr(self, self.resample_name, None)
        return resample(h) if resample is not None else h


def mid_blocks(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.conv_blocks = nn.ModuleList()
        for i in range(n):
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            last = i == n - 1
            self.conv_blocks.append(
                _Level(block_in, block_out, num_res_blocks, last, None if last else Downsample(block_out),
                       "downsample")
            )
        block_in = ch * ch_mult[-1]
        self.mid = mid_blocks(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = mid_blocks(block_in)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            block_out = ch * ch_mult[i]
            self.conv_blocks.append(
                _Level(block_in, block_out, num_res_blocks + 1, i == n - 1, Upsample(block_out) if i else None,
                       "upsample")
            )
            block_in = block_out
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_e: int, e_dim: int, l2_norm: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) -> code indices (B, h, w)."""
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, C)
        if self.l2_norm:
            zf = F.normalize(zf, p=2, dim=-1)
        e = self.codebook()
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()  # (N, n_e), as LlamaGen
        return d.argmin(dim=1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, h, w) -> quantised latents (B, C, h, w)."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg.ch, cfg.encoder_ch_mult, cfg.num_res_blocks, cfg.z_channels)
        self.decoder = Decoder(cfg.ch, cfg.decoder_ch_mult, cfg.num_res_blocks, cfg.z_channels)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> pre-quantisation latents (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f)."""
        return self.quantize.nearest(self.encode_latent(x))

    def decode_latent(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, h, w) or (B, h*w) of a square grid -> images (B, 3, H, W), unclamped."""
        if codes.dim() == 2:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"{codes.shape[1]} codes per image do not form a square grid")
            codes = codes.view(codes.shape[0], side, side)
        quant = self.quantize.lookup(codes.long()).to(self.post_quant_conv.weight.dtype)
        return self.decode_latent(quant)
