"""A decode step whose blocks run each post and the next pre as one call (compiled: one graph, what
compile_blocks sets up) computes exactly what the block-by-block loop does; eager here."""

from __future__ import annotations

import torch

from adsa_core.config import gpt_preset
from adsa_core.model.llamagen import Transformer, block_post_pre
from adsa_core.reference import StaticKVCache


def causal_cache(model: Transformer, batch: int, steps: int) -> StaticKVCache:
    """The reference sampler's dense cache: every token's K/V kept, each attending to those before it."""
    cache = StaticKVCache(model, batch, steps)
    cache.mask.copy_(torch.ones(steps, steps, dtype=torch.bool).tril())
    return cache


def test_fused_decode_layers_match_the_block_loop():
    torch.manual_seed(0)
    cfg = gpt_preset("GPT-B", 256)
    cfg = type(cfg).from_dict({**cfg.to_dict(), "n_layer": 3, "dim": 64, "n_head": 4})
    model = Transformer(cfg).eval()
    caches = causal_cache(model, 2, 4), causal_cache(model, 2, 4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 4))
    with torch.no_grad():
        for t in range(4):
            h = model.tok_embeddings(tokens[:, t]).unsqueeze(1)  # (B, 1, dim)
            pos = torch.full((2, 1), t + 1)
            for cache in caches:
                cache.input_pos = torch.tensor([t])
            model.post_pre = None
            ref = model.forward_embeddings(h, pos, caches[0])
            model.post_pre = block_post_pre
            got = model.forward_embeddings(h, pos, caches[1])
            assert torch.equal(got, ref), t
