"""The one request validation: run once, in the engine core, when a request is submitted.

Everything a request can get wrong against the loaded model and the KV pool is checked here, before
anything is queued, so a refusal is an InvalidRequest (HTTP 422) and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import SEED_END, ConfigError, GPTConfig, ResolvedCache
from .request import GenerationRequest, InvalidRequest


def validate_request(req: GenerationRequest, cfg: GPTConfig, default_cache: ResolvedCache,
                     fits_ever: Callable[[int, int], bool]) -> ResolvedCache:
    """The request's resolved KV cache; raises InvalidRequest. fits_ever(n_seqs, budget): the pool could hold it."""
    if cfg.model_type == "c2i":
        if not isinstance(req.condition, int) or isinstance(req.condition, bool):
            raise InvalidRequest("this is a class-conditional model: give an integer class label", "condition")
        if not 0 <= req.condition < cfg.num_classes:
            raise InvalidRequest(f"class label {req.condition} is outside 0..{cfg.num_classes - 1}", "condition")
    else:
        c = req.condition
        if not torch.is_tensor(c) or tuple(c.shape) != (cfg.cls_token_num, cfg.caption_dim):
            raise InvalidRequest(f"text model: caption features must be ({cfg.cls_token_num}, {cfg.caption_dim})",
                                 "condition")
        if req.emb_mask is not None and tuple(req.emb_mask.shape) != (cfg.cls_token_num,):
            raise InvalidRequest(f"caption mask must have shape ({cfg.cls_token_num},)", "condition")
    if req.sampling.uses_cfg and cfg.model_type == "c2i" and not cfg.has_null_class:
        raise InvalidRequest("this checkpoint has no 'no class' embedding: use cfg_scale <= 1", "sampling")
    if not 0 <= req.seed < SEED_END:
        raise InvalidRequest("seed must be in [0, 2**63)", "seed")
    if req.forced_tokens is not None:
        forced = req.forced_tokens
        if tuple(forced.shape) != (cfg.block_size,):
            raise InvalidRequest(f"forced tokens must have shape ({cfg.block_size},)", "forced_tokens")
        # one out of range would index past the embedding and the codebook: on a GPU a device assert for everyone
        if forced.is_floating_point() or not 0 <= int(forced.min()) <= int(forced.max()) < cfg.vocab_size:
            raise InvalidRequest(f"forced tokens must be integers in [0, {cfg.vocab_size})", "forced_tokens")
    try:
        cache = req.cache.resolve(cfg) if req.cache is not None else default_cache
    except ConfigError as e:
        raise InvalidRequest(str(e), "cache") from None
    n_seqs = 2 if req.sampling.uses_cfg else 1
    if not fits_ever(n_seqs, cache.budget):
        raise InvalidRequest(f"kv budget {cache.budget} x {n_seqs} sequences does not fit the KV pool", "cache")
    return cache


def check_submission_size(n_images: int, queue_capacity: int) -> None:
    """One submission's images all queue or none do: more than an idle engine queues would be refused forever."""
    if n_images > queue_capacity:
        raise InvalidRequest(f"{n_images} images in one request: this server queues at most {queue_capacity} at once; "
                             "send them in smaller requests", "n_images")


def encode_prompts(reqs: list[GenerationRequest], cfg: GPTConfig, text_encoder: object | None) -> None:
    """t2i prompts -> caption features and masks, in place, one batch for all of them."""
    todo = [r for r in reqs if r.prompt is not None]
    if not todo:
        return
    if cfg.model_type != "t2i":
        raise InvalidRequest("this is a class-conditional model: give a class label, not a prompt", "condition")
    if text_encoder is None:
        raise InvalidRequest("this text model was started without a text encoder: prompts are unavailable",
                             "condition")
    feats, masks = text_encoder.encode([r.prompt for r in todo])  # type: ignore[attr-defined]
    for r, f, m in zip(todo, feats, masks):
        r.condition, r.emb_mask, r.prompt = f, m, None
