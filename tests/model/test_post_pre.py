"""A decode step whose blocks run each post and the next pre as one call (compiled: one graph, what
compile_blocks sets up) computes exactly what the block-by-block loop does; eager here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adsa_core.config import gpt_preset
from adsa_core.model.llamagen import Transformer, block_post_pre


class DenseCache:
    """Every token's K/V kept: attention of the new token over all of them (a naive reference cache)."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if layer in self.kv:
            k, v = (torch.cat([old, new], dim=2) for old, new in zip(self.kv[layer], (k, v)))
        self.kv[layer] = (k, v)
        return F.scaled_dot_product_attention(q, k, v)


def test_fused_decode_layers_match_the_block_loop():
    torch.manual_seed(0)
    cfg = gpt_preset("GPT-B", 256)
    cfg = type(cfg).from_dict({**cfg.to_dict(), "n_layer": 3, "dim": 64, "n_head": 4})
    model = Transformer(cfg).eval()
    caches = DenseCache(), DenseCache()
    tokens = torch.randint(0, cfg.vocab_size, (2, 4))
    with torch.no_grad():
        for t in range(4):
            h = model.tok_embeddings(tokens[:, t]).unsqueeze(1)  # (B, 1, dim)
            pos = torch.full((2, 1), t + 1)
            model.post_pre = None
            ref = model.forward_embeddings(h, pos, caches[0])
            model.post_pre = block_post_pre
            got = model.forward_embeddings(h, pos, caches[1])
            assert torch.equal(got, ref), t
