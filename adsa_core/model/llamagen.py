"""LlamaGen GPT (class- and text-conditional), with LlamaGen's parameter names.

One model file (nanoGPT style). Attention over past tokens is delegated to a `KVCache`
object, so the same weights run under the reference's static cache, the engine's
sparse pooled cache, or no cache at all (teacher forcing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GPTConfig
from ..kv.kernels import HAS_TRITON
from .rope import apply_rotary_emb, precompute_freqs_cis_2d

if HAS_TRITON:
    from ..kv.kernels import pdl
    from . import skinny_matmul


class KVCache(Protocol):
    """Stores the new tokens' K/V for one layer and attends over everything kept so far."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, H, T, D); k, v: (B, Hkv, T, D) of the new tokens. Returns (B, H, T, D)."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def few_row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T: products of a few rows on a GPU (decode at batch 1-8) through `skinny_matmul`'s kernel,
    everything else through F.linear (cuBLAS)."""
    if HAS_TRITON and skinny_matmul.takes(x, weight):
        return skinny_matmul.linear(x, weight)
    return F.linear(x, weight)


class SkinnyLinear(nn.Module):
    """A bias-free linear layer through `few_row_linear`. Same weight, same state-dict key."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, K), shared with the layer it replaces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return few_row_linear(x, self.weight)


class LabelEmbedder(nn.Module):
    """Class label -> one condition token. Row `num_classes` is the "no class" label for CFG."""

    def __init__(self, num_classes: int, dim: int, has_null_class: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, dim)


class CaptionMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """T5 caption features -> condition tokens. `uncond_embedding` is the CFG "no caption"."""

    uncond_embedding: torch.Tensor  # a buffer (registered below)

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.zeros(token_num, caption_dim))

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(caption)  # (B, T_cond, dim)


class FeedForward(nn.Module):
    w13: torch.Tensor | nn.Module | None  # the fused w1/w3 weight once fuse() ran (fp8 matmuls: a module)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.ffn_hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.register_buffer("w13", None, persistent=False)  # set by fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:  # only the engine fuses (compile_blocks), and its decode step's few rows on a GPU
            # take the skinny kernel: the SwiGLU adds its slices, and under PDL the step's launch chain stays unbroken
            # (run 31: a lone request's step 1.46 -> 1.43 ms); fp8 matmuls hold an Fp8Linear here
            h = self.w13(x) if isinstance(self.w13, nn.Module) else few_row_linear(x, self.w13)
            gate, up = h.chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    @torch.no_grad()
    def fuse(self) -> None:
        """One (2 * hidden, dim) matmul instead of w1 and w3: at decode batch sizes a matmul's fixed cost
        is as large as its weight read. w1 and w3 become views of the fused weight (no extra memory;
        the state dict is unchanged). Call it after moving the model: .to() would separate the views."""
        if self.w13 is not None:
            return
        hidden = self.w1.weight.shape[0]
        w13 = torch.cat([self.w1.weight, self.w3.weight])
        self.w1.weight = nn.Parameter(w13[:hidden], requires_grad=False)
        self.w3.weight = nn.Parameter(w13[hidden:], requires_grad=False)
        self.w13 = w13


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dim = cfg.dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def project(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (B, T, dim) -> q (B, H, T, D), k and v (B, Hkv, T, D), RoPE applied to q and k."""
        B, T, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = apply_rotary_emb(q.view(B, T, self.n_head, self.head_dim), freqs_cis)  # (B, T, H, D)
        k = apply_rotary_emb(k.view(B, T, self.n_kv_head, self.head_dim), freqs_cis)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        return tuple(t.transpose(1, 2) for t in (q, k, v))  # (B, H|Hkv, T, D)

    def attend(self, q, k, v, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        if cache is not None:
            return cache.attend(self.layer, q, k, v)
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def block_pre(block: TransformerBlock, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Everything of a block before attention: norm, QKV projection, RoPE."""
    return block.attention.project(block.attention_norm(x), freqs_cis)


def block_post(block: TransformerBlock, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Everything after attention: output projection, residuals, norm and feed-forward.
    y: (B, H, T, D) attention output."""
    B, H, T, D = y.shape
    h = x + block.attention.wo(y.transpose(1, 2).reshape(B, T, H * D))
    return h + block.feed_forward(block.ffn_norm(h))


def block_post_pre(block: TransformerBlock, next_block: TransformerBlock, x: torch.Tensor, y: torch.Tensor,
                   freqs_cis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`block`'s post, then `next_block`'s pre: in one compiled graph the residual add and the next norm fuse,
    one kernel fewer per layer at decode. Returns h, q, k, v."""
    h = block_post(block, x, y)
    return (h, *block_pre(next_block, h, freqs_cis))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attention = Attention(cfg, layer)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    # The parts around attention are plain functions so the engine can swap in compiled versions
    # (`Transformer.compile_blocks`): one compiled graph serves every layer.
    pre = staticmethod(block_pre)
    post = staticmethod(block_post)

    def forward(self, x, freqs_cis, cache, mask):
        q, k, v = self.pre(self, x, freqs_cis)
        return self.post(self, x, self.attention.attend(q, k, v, cache, mask))


class Transformer(nn.Module):
    cls_embedding: LabelEmbedder | CaptionEmbedder
    freqs_cis: torch.Tensor  # a buffer (registered below)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        if cfg.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.has_null_class)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # compiled block_post_pre, set by compile_blocks: decode steps cross each layer boundary in one graph
        self.post_pre: Callable[..., tuple[torch.Tensor, ...]] | None = None
        # Not persistent: official files may or may not carry it; it is recomputed either way.
        self.register_buffer(
            "freqs_cis",
            precompute_freqs_cis_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num),
            persistent=False,
        )

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def compile_blocks(self) -> None:
        """Fuse each block's elementwise work around attention with torch.compile (GPU decode), and its
        w1/w3 matmuls into one. Attention itself stays outside: it is the pool's Triton kernel, so a decode
        step is one graph before layer 0's attention, one per layer boundary (`block_post_pre`) and one after.
        Only decode steps (one token per row: static shapes, one per batch bucket, compiled at warm-up) run
        compiled; a prefill's shape depends on how many requests arrived together, and compiling each new
        one would stall serving, so prefills run eagerly."""
        blocks = [block for block in self.layers if isinstance(block, TransformerBlock)]  # all of them
        for block in blocks:
            block.feed_forward.fuse()
        if self.device.type == "cuda":
            self._skinny_matmuls(blocks)
        # one compile per batch bucket (up to 11): past dynamo's default limit of 8 it would fall back to eager
        dyn = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        setattr(dyn, limit, max(getattr(dyn, limit), 32))
        pre_c, post_c = _compile_decode(block_pre, self.device), _compile_decode(block_post, self.device)
        self.post_pre = _compile_decode(block_post_pre, self.device)

        def pre(block, x, freqs_cis):  # x: (B, T, dim)
            return (pre_c if x.shape[1] == 1 else block_pre)(block, x, freqs_cis)

        def post(block, x, attn):
            return (post_c if x.shape[1] == 1 else block_post)(block, x, attn)

        for block in blocks:
            block.pre, block.post = pre, post

    def _skinny_matmuls(self, blocks: list[TransformerBlock]) -> None:
        """Each block's wo and w2 as a `SkinnyLinear` (bf16/f16; fp8 matmuls keep their own modules): the two
        products of dim outputs, where cuBLAS at 2-16 rows reads 0.7-1.1 TB/s (run 27), and whose consumer, the
        residual add and RMSNorm, takes the slices' adds in its own kernel. The fused w1/w3 takes the kernel in
        FeedForward. wqkv keeps cuBLAS: its consumers (v straight into the pool kernel) would need extra kernels.
        Only the engine's decode path calls this: the reference sampler keeps cuBLAS, like the public code it
        stands for."""
        for block in blocks:
            for owner, name in ((block.attention, "wo"), (block.feed_forward, "w2")):
                layer = getattr(owner, name)
                if type(layer) is nn.Linear:
                    setattr(owner, name, SkinnyLinear(layer.weight))

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """c2i: labels (B,) -> (B, 1, dim); t2i: caption features (B, 120, caption_dim) -> (B, 120, dim)."""
        if self.config.model_type == "c2i":
            return self.cls_embedding(cond)
        return self.cls_embedding(cond.to(self.dtype))[:, : self.config.cls_token_num]

    def embed_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step's inputs (B,) -> (B, 1, dim): image tokens, except that a c2i row at position 0 holds
        its class label, embedded as the condition token (so a c2i request needs no prefill)."""
        if not isinstance(self.cls_embedding, LabelEmbedder):  # t2i: captions were prefilled
            return self.tok_embeddings(tokens).unsqueeze(1)
        # both tables are read for every row (static shapes): clamp each index into its own table
        # rows by indexing, not nn.Embedding, whose index_select takes its small-index kernel for the
        # <= 16 rows of batches up to 8 (~8.5 us each of the two tables at batch 8, run 23's profile)
        table = self.cls_embedding.embedding_table.weight
        words = self.tok_embeddings.weight
        h = words[tokens.clamp(max=words.shape[0] - 1)]  # (B, dim)
        h = torch.where((positions == 0)[:, None], table[tokens.clamp(max=table.shape[0] - 1)], h)
        return h.unsqueeze(1)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The CFG unconditional input matching `cond` (the "no class" label, or the null caption)."""
        if self.config.model_type == "c2i":
            if not self.config.has_null_class:
                raise ValueError("this checkpoint has no 'no class' embedding row; CFG is unavailable")
            return torch.full_like(cond, self.config.num_classes)
        assert isinstance(self.cls_embedding, CaptionEmbedder)  # t2i
        return self.cls_embedding.uncond_embedding.to(cond.dtype).expand_as(cond)

    def forward_embeddings(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h: (B, T, dim) input embeddings at `positions` ((T,) or (B, T)). Returns logits (B, T, V) in the model's
        dtype, as the output head computes them: a caller that wants fp32 converts where it stores them (the
        decode step's copy into its fp32 buffer does, in the one kernel the copy takes anyway)."""
        freqs_cis = self.freqs_cis[positions]  # (T|B,T, D/2, 2)
        if self.post_pre is not None and cache is not None and h.shape[1] == 1:
            h = self._decode_layers(h, freqs_cis, cache)
        else:
            for layer in self.layers:
                h = layer(h, freqs_cis, cache, mask)
        return self.output(self.norm(h))

    def _decode_layers(self, h: torch.Tensor, freqs_cis: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The blocks of a decode step with each post and the next pre as one call (`post_pre`)."""
        assert self.post_pre is not None
        blocks = [block for block in self.layers if isinstance(block, TransformerBlock)]
        q, k, v = blocks[0].pre(blocks[0], h, freqs_cis)
        for block, next_block in zip(blocks, blocks[1:]):
            y = block.attention.attend(q, k, v, cache, None)
            h, q, k, v = self.post_pre(block, next_block, h, y, freqs_cis)
        last = blocks[-1]
        return last.post(last, h, last.attention.attend(q, k, v, cache, None))

    def forward(
        self, idx: torch.Tensor, cond: torch.Tensor, emb_masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits over condition + image tokens, no cache.

        idx: (B, T) image tokens; cond: labels or caption features. Returns (B, T_cond + T, V);
        row T_cond - 1 predicts image token 0. fp32.
        """
        h = torch.cat([self.embed_condition(cond), self.tok_embeddings(idx)], dim=1)
        L = h.shape[1]
        mask = None
        if emb_masks is not None:
            mask = prompt_attention_mask(emb_masks, L)[:, None]  # (B, 1, L, L)
        return self.forward_embeddings(h, torch.arange(L, device=h.device), None, mask).float()


def _compile_decode(fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """torch.compile of a decode step's block function; steps of few rows get a second compile whose kernels
    launch with PDL (kv.kernels.pdl: it pays there only). The rows are the first tensor argument's first dim."""
    big = torch.compile(fn, dynamic=False)
    if device.type != "cuda" or not HAS_TRITON or not (options := pdl.inductor_options(device)):
        return big
    small = torch.compile(fn, dynamic=False, options=options)

    def by_rows(*args: Any) -> Any:
        rows = next(a for a in args if isinstance(a, torch.Tensor)).shape[0]
        return (small if rows <= pdl.MAX_ROWS else big)(*args)

    return by_rows


def prompt_attention_mask(emb_masks: torch.Tensor, length: int) -> torch.Tensor:
    """LlamaGen's text mask, (B, L, L) bool: causal, padded caption columns hidden, diagonal kept."""
    B, T = emb_masks.shape
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=emb_masks.device))
    mask = causal.unsqueeze(0).repeat(B, 1, 1)
    mask[:, :, :T] &= emb_masks.bool().unsqueeze(1)
    mask |= torch.eye(length, dtype=torch.bool, device=emb_masks.device)
    return mask
