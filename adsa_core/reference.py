"""The plain dense sampler: LlamaGen's `generate()` with a static KV cache.

This is the oracle every faster path is checked against: batch, CFG (conditional and
unconditional halves of one batch), cfg interval, temperature / top-k / top-p, greedy,
and LlamaGen's text mask. Deliberately simple; the engine is where speed lives.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .model.llamagen import Transformer, prompt_attention_mask
from .sampling import SamplingParams, cfg_combine, sample_tokens


class StaticKVCache:
    """gpt-fast style: (B, Hkv, S, D) per layer, written at `input_pos`, read with a (B, S, S) mask."""

    def __init__(self, model: Transformer, batch: int, max_len: int, static: bool = False):
        cfg = model.config
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.n_layer)]
        self.mask = torch.zeros(batch, max_len, max_len, dtype=torch.bool, device=model.device)  # (B, S, S)
        self.rep = cfg.n_head // cfg.kv_heads
        self.input_pos = torch.arange(1, device=model.device)
        if static:  # fixed addresses let torch.compile capture a CUDA graph
            for t in [*self.k, *self.v, self.mask]:
                torch._dynamo.mark_static_address(t)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pos = self.input_pos
        self.k[layer][:, :, pos] = k
        self.v[layer][:, :, pos] = v
        keys, values = self.k[layer], self.v[layer]
        if self.rep > 1:
            keys, values = keys.repeat_interleave(self.rep, 1), values.repeat_interleave(self.rep, 1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask[:, None, pos])


@torch.no_grad()
def generate(
    model: Transformer,
    cond: torch.Tensor,
    params: SamplingParams,
    seeds: torch.Tensor | None = None,
    emb_masks: torch.Tensor | None = None,
    on_token: Callable[[int], None] | None = None,
    compile_step: bool = False,
) -> torch.Tensor:
    """Image tokens (B, block_size) int64 for condition `cond` (labels (B,) or captions (B, 120, C)).

    seeds: (B,) per-image seeds (default 0..B-1); emb_masks: (B, 120) caption mask (t2i).
    compile_step: run the public sampler's fast path, the benchmark's baseline: the one-token decode
    step under torch.compile "reduce-overhead" (CUDA graphs, fullgraph), and the sampling compiled
    too, so that its longer seeded algorithm launches no more kernels than the public one's. The
    attention is SDPA's own choice (the memory-efficient kernel, bf16 read once). Not the math ops that
    LlamaGen's decode loop asks for: behind the cache's in-place write Inductor upcast the whole cache to
    fp32 per layer, 5.4x slower than the public code at batch 64 (docs/PERFORMANCE.md, run 19).
    Either way no step waits for the GPU: positions advance on the device, as LlamaGen's `input_pos += 1`.
    """
    cfg = model.config
    B, device = cond.shape[0], model.device
    cond = cond.to(device)
    T_cond, n_tokens = cfg.cls_token_num, cfg.block_size
    seeds = (torch.arange(B) if seeds is None else seeds).to(device)
    use_cfg = params.uses_cfg
    cond_all = torch.cat([cond, model.null_condition(cond)]) if use_cfg else cond
    rows = cond_all.shape[0]

    # LlamaGen rounds its cache up to a multiple of 8 (aligned rows for the attention kernels); the extra
    # slots are never written and the causal mask hides them
    max_len = -(-(T_cond + n_tokens) // 8) * 8
    if emb_masks is not None:
        m = emb_masks.to(device)
        mask = prompt_attention_mask(torch.cat([m, m]) if use_cfg else m, max_len)  # (rows, S, S)
    else:
        mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=device)).expand(rows, -1, -1)
    cache = _static_cache(model, rows, max_len) if compile_step else StaticKVCache(model, rows, max_len)
    cache.mask.copy_(mask)
    step = _compiled_step() if compile_step else _decode_step
    pick = _compiled_pick() if compile_step else _pick

    def settings(n: int):
        return (torch.full((n,), params.temperature, device=device),
                torch.full((n,), params.top_k, device=device, dtype=torch.long),
                torch.full((n,), params.top_p, device=device),
                torch.full((n,), params.greedy, device=device, dtype=torch.bool))

    temperature, top_k, top_p, greedy = settings(B)
    out = torch.empty(B, n_tokens, dtype=torch.long, device=device)
    h = model.embed_condition(cond_all)  # (rows, T_cond, dim)
    input_pos = torch.arange(T_cond, device=device)
    position = torch.zeros(B, dtype=torch.long, device=device)  # image token index, the draw's counter
    for i in range(n_tokens):
        if i == 0:
            logits = _decode_step(model, cache, h, input_pos)  # (rows, V)
            input_pos = input_pos[-1:] + 1  # from here on advanced in place: a host value would sync
        else:
            logits = step(model, cache, h, input_pos)
            input_pos += 1
        cfg_scale = params.cfg_scale if params.cfg_active(i) else None
        token = pick(logits, cfg_scale, seeds, position, temperature, top_k, top_p, greedy, params.top_k)
        position += 1
        out[:, i] = token
        if on_token is not None:
            on_token(i)
        if i + 1 < n_tokens:
            h = model.tok_embeddings(torch.cat([token, token]) if use_cfg else token).unsqueeze(1)
    return out


def _pick(logits: torch.Tensor, cfg_scale: float | None, seeds: torch.Tensor, positions: torch.Tensor,
          temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, greedy: torch.Tensor,
          k_max: int) -> torch.Tensor:
    """The next token of each image from the step's logits (rows, V): guidance (cfg_scale None: the
    conditional half only, outside the cfg interval or without CFG), then `sample_tokens`."""
    B = seeds.shape[0]
    logits = logits[:B] if cfg_scale is None else cfg_combine(logits[:B], logits[B:], cfg_scale)
    return sample_tokens(logits, seeds, positions, temperature, top_k, top_p, greedy, k_max=k_max)


def _decode_step(model: Transformer, cache: StaticKVCache, h: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    cache.input_pos = input_pos
    return model.forward_embeddings(h, input_pos, cache)[:, -1].float()


@functools.cache
def _compiled_step() -> Callable:
    # created on first use: importing torch._dynamo costs seconds at start-up
    # one static graph per batch size: with torch.compile's default (a symbolic batch from the second size on,
    # as the public call) the reference ran 6.68 ms per token at batch 8 after batch 1 in one process, 2.5x its
    # batch-1 step (docs/PERFORMANCE.md, run 16), where the public code's second size ran at full speed
    return torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)


@functools.cache
def _compiled_pick() -> Callable:
    # default mode (no CUDA graph, like the public sampler's eager sampling): fusion alone turns the ~60
    # small kernels of the seeded filter and draw (the hash alone is ~30) into a handful
    compiled: Callable = torch.compile(_pick, fullgraph=True, dynamic=False)  # static per batch: see _compiled_step

    def pick(*args):
        nonlocal compiled
        try:
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 - the baseline must still run: it only costs speed, said loudly
            warnings.warn(f"reference: compiling the sampling failed, it runs eagerly from now on: {e!r}", stacklevel=2)
            compiled = _pick
            return _pick(*args)

    return pick


_static_caches: dict[tuple, StaticKVCache] = {}


def release_static_caches() -> None:
    """Free the compiled path's reused caches (the benchmark measures memory between runs)."""
    _static_caches.clear()


def _static_cache(model: Transformer, rows: int, max_len: int) -> StaticKVCache:
    """One cache per shape, reused across calls so the compiled step is not recompiled."""
    key = (id(model), rows, max_len, model.dtype, model.device)
    if key not in _static_caches:
        _static_caches[key] = StaticKVCache(model, rows, max_len, static=True)
    return _static_caches[key]
