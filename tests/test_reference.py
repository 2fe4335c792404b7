"""Sampling and the dense reference sampler, checked against independent ports of LlamaGen's code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adsa_core.reference import generate
from adsa_core.sampling import SamplingParams, sample_tokens, uniform_from


# --- LlamaGen's autoregressive/models/generate.py, ported as directly as possible -----------------
def top_k_top_p_filtering(logits, top_k: int = 0, top_p: float = 1.0, filter_value=-float("Inf"),
                          min_tokens_to_keep: int = 1):
    if top_k > 0:
        top_k = min(max(top_k, min_tokens_to_keep), logits.size(-1))  # Safety check
        # Remove all tokens with a probability less than the last token of the top-k
        indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
        logits[indices_to_remove] = filter_value
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        # Remove tokens with cumulative probability above the threshold (token with 0 are kept)
        sorted_indices_to_remove = cumulative_probs > top_p
        if min_tokens_to_keep > 1:
            sorted_indices_to_remove[..., :min_tokens_to_keep] = 0
        # Shift the indices to the right to keep also the first token above the threshold
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        # scatter sorted tensors to original indexing
        indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
        logits[indices_to_remove] = filter_value
    return logits


def llamagen_probs(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """`sample()` up to the softmax; logits (B, V)."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
    return F.softmax(logits, dim=-1)
# ---------------------------------------------------------------------------------------------------


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token an inverse-CDF draw u picks from probs (B, V), walking the vocabulary in index order."""
    cdf = probs.double().cumsum(-1)
    target = (u.view(-1, 1) * cdf[:, -1:]).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.searchsorted(cdf, target).clamp_max(probs.shape[1] - 1).view(-1)


def rows(n: int, **settings) -> tuple[torch.Tensor, ...]:
    s = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False, **settings}
    return (torch.full((n,), float(s["temperature"])), torch.full((n,), s["top_k"], dtype=torch.long),
            torch.full((n,), float(s["top_p"])), torch.full((n,), s["greedy"], dtype=torch.bool))


SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.7, top_k=5, top_p=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.8),
    dict(temperature=1.0, top_k=20, top_p=0.5),
    dict(temperature=0.5, top_k=1, top_p=0.9),
    dict(temperature=2.0, top_k=64, top_p=0.95),
]


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: "t{temperature}-k{top_k}-p{top_p}".format(**s))
def test_sample_tokens_follows_llamagen_filtering(s):
    gen = torch.Generator().manual_seed(0)
    B, V = 512, 64
    logits = torch.randn(B, V, generator=gen) * 3
    seeds = torch.arange(B) * 7919 + 11
    positions = torch.arange(B) % 37
    tokens = sample_tokens(logits.clone(), seeds, positions, *rows(B, **s))
    probs = llamagen_probs(logits.clone(), **s)
    assert (probs.gather(1, tokens.view(-1, 1)) > 0).all(), "a filtered-out token was drawn"
    assert torch.equal(tokens, inverse_cdf(probs, uniform_from(seeds, positions)))


def test_top_of_vocabulary_path_draws_the_same_tokens():
    """k_max: only the largest logits are sorted; per-row top_k up to k_max, with top_p and greedy rows."""
    gen = torch.Generator().manual_seed(3)
    B, V = 256, 1000
    logits = torch.randn(B, V, generator=gen) * 2
    logits[:8, 1:40] = logits[:8, :1]  # exact ties across the k-th largest of some rows
    seeds, positions = torch.arange(B) * 31 + 5, torch.arange(B) % 11
    temperature, _, top_p, greedy = rows(B, temperature=0.9, top_p=0.9)
    top_k = torch.tensor([5, 20, 64, 300])[torch.arange(B) % 4]
    top_p[::3] = 1.0
    greedy[::7] = True
    full = sample_tokens(logits, seeds, positions, temperature, top_k, top_p, greedy)
    fast = sample_tokens(logits, seeds, positions, temperature, top_k, top_p, greedy, k_max=300)
    assert torch.equal(fast, full)


def test_greedy_is_argmax():
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    tokens = sample_tokens(logits, torch.arange(32), torch.zeros(32), *rows(32, greedy=True, top_k=3))
    assert torch.equal(tokens, logits.argmax(-1))


def test_per_row_settings_equal_separate_rows():
    gen = torch.Generator().manual_seed(2)
    B, V = len(SETTINGS) * 4, 40
    logits = torch.randn(B, V, generator=gen)
    seeds, positions = torch.arange(B) + 100, torch.arange(B) * 3
    per_row = [SETTINGS[i % len(SETTINGS)] for i in range(B)]
    settings = [torch.cat(col) for col in zip(*(rows(1, **s) for s in per_row), strict=True)]
    settings[3][::5] = True  # some greedy rows too
    batched = sample_tokens(logits, seeds, positions, *settings)
    for i in range(B):
        alone = sample_tokens(logits[i: i + 1], seeds[i: i + 1], positions[i: i + 1],
                              *(t[i: i + 1] for t in settings))
        assert batched[i] == alone[0], i


def test_uniforms_depend_only_on_seed_and_position():
    u = uniform_from(torch.tensor([3, 3, 4, 2**40 + 3]), torch.tensor([5, 6, 5, 5]))
    assert u[0] == uniform_from(torch.tensor([3]), torch.tensor([5]))[0]
    assert len(set(u.tolist())) == 4 and ((u >= 0) & (u < 1)).all()


SAMPLED = SamplingParams(cfg_scale=3.0, temperature=1.0, top_k=30, top_p=0.95)


def test_same_seed_same_image(c2i_gpt):
    labels, seeds = torch.tensor([1, 7, 3]), torch.tensor([10, 11, 12])
    a = generate(c2i_gpt, labels, SAMPLED, seeds)
    b = generate(c2i_gpt, labels, SAMPLED, seeds)
    assert torch.equal(a, b)
    c = generate(c2i_gpt, labels, SAMPLED, seeds + 100)
    assert not torch.equal(a, c)


def test_image_does_not_depend_on_batch_neighbours(c2i_gpt):
    labels, seeds = torch.tensor([4, 1, 7, 3, 9]), torch.tensor([5, 42, 6, 7, 8])
    batch = generate(c2i_gpt, labels, SAMPLED, seeds)
    alone = generate(c2i_gpt, labels[1:2], SAMPLED, seeds[1:2])
    assert torch.equal(batch[1], alone[0])
    other = generate(c2i_gpt, torch.tensor([0, 1]), SAMPLED, torch.tensor([99, 42]))
    assert torch.equal(batch[1], other[1])


def test_t2i_batch_invariance(t2i_gpt, t2i_io):
    params = SamplingParams(cfg_scale=7.5, top_k=20)
    cap, masks = t2i_io["caption"], t2i_io["emb_masks"]
    both = generate(t2i_gpt, cap, params, torch.tensor([3, 4]), masks)
    second = generate(t2i_gpt, cap[1:], params, torch.tensor([4]), masks[1:])
    assert torch.equal(both[1], second[0])


@torch.no_grad()
def explicit_cfg_loop(model, labels, params: SamplingParams, seeds) -> torch.Tensor:
    """No KV cache: re-run the whole prefix for each token.

    LlamaGen applies CFG to token j iff cfg_interval == -1 or j <= cfg_interval + 1.
    """
    B, T = labels.shape[0], model.config.block_size
    null = torch.full_like(labels, model.config.num_classes)
    idx = torch.zeros(B, 0, dtype=torch.long)
    settings = rows(B, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                    greedy=params.greedy)
    for j in range(T):
        cond = model(idx, labels)[:, -1]  # (B, V): the last position predicts token j
        if params.cfg_scale > 1.0 and (params.cfg_interval == -1 or j <= params.cfg_interval + 1):
            uncond = model(idx, null)[:, -1]
            logits = uncond + (cond - uncond) * params.cfg_scale
        else:
            logits = cond
        token = sample_tokens(logits, seeds, torch.full((B,), j), *settings)
        idx = torch.cat([idx, token[:, None]], dim=1)
    return idx


@pytest.mark.parametrize("interval", [-1, 0, 3, 20])
@pytest.mark.parametrize("greedy", [True, False])
def test_cfg_interval_matches_explicit_loop(c2i_gpt, interval, greedy):
    labels, seeds = torch.tensor([1, 7, 3]), torch.tensor([0, 1, 2])
    params = SamplingParams(cfg_scale=4.0, cfg_interval=interval, greedy=greedy, top_k=40)
    expected = explicit_cfg_loop(c2i_gpt, labels, params, seeds)
    assert torch.equal(generate(c2i_gpt, labels, params, seeds), expected)


def test_cfg_interval_changes_the_image(c2i_gpt):
    labels = torch.tensor([1, 7, 3])
    full = generate(c2i_gpt, labels, SamplingParams(cfg_scale=4.0, greedy=True))
    early = generate(c2i_gpt, labels, SamplingParams(cfg_scale=4.0, cfg_interval=0, greedy=True))
    assert torch.equal(full[:, :2], early[:, :2])  # tokens 0 and 1 are guided in both
    assert not torch.equal(full, early)
