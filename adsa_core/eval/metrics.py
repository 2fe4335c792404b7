"""The fidelity metrics, plain tensor maths: Fréchet distance and feature statistics (FID), the teacher-forced
comparison of two next-token distributions (KL, top-1 agreement, NLL), and agreement between free-running runs."""

from __future__ import annotations

import torch

# Fréchet distance (no scipy: symmetric PSD square roots through eigh, in float64)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) between two Gaussians.

    tr((S1 S2)^(1/2)) = tr((R S2 R)^(1/2)) with R = S1^(1/2): S1 S2 and R S2 R are similar, and the
    latter is symmetric PSD, so eigh is enough (scipy's general sqrtm is not needed).
    """
    mu1, mu2 = (torch.as_tensor(x, dtype=torch.float64).reshape(-1) for x in (mu1, mu2))
    s1, s2 = (torch.as_tensor(x, dtype=torch.float64) for x in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"Fréchet distance: shapes do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
            f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}"
        )
    r1 = _sqrtm_psd((s1 + s1.T) / 2)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    d = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return float(d.clamp_min(0))


def feature_stats(features: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and covariance (D, D) in float64 of features (N, D), optionally weighted per row.

    Unweighted this is numpy's `cov` (N - 1 normalisation); weights are reliability weights
    (normalised; the unbiased correction is 1 - sum w^2), used to weigh every class equally.
    """
    x = features.double()
    n = x.shape[0]
    if n < 2:
        raise ValueError("feature statistics need at least 2 samples")
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else weights.double() / weights.sum()
    mu = (w[:, None] * x).sum(0)
    xc = x - mu
    sigma = (w[:, None] * xc).T @ xc / (1.0 - w.pow(2).sum())
    return mu, sigma


def class_balance_weights(labels: torch.Tensor) -> torch.Tensor:
    """1 / (images of its class) per image: every class weighs the same."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].double()


# Teacher-forced comparison (KL, agreement, NLL) and free-running agreement


@torch.no_grad()
def token_metrics(dense_lp: torch.Tensor, policy_lp: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-step comparison of one image's guided next-token distributions.

    dense_lp, policy_lp: (T, V) log-probs; tokens: (T,) the forced tokens. Returns (T,) tensors:
    kl = KL(dense || policy), agree = argmax equality, nll / nll_dense = -log p(forced token).
    """
    d, p = dense_lp.double(), policy_lp.double()
    kl = (d.exp() * (d - p)).sum(-1).clamp_min(0)
    t = tokens.view(-1, 1).to(d.device)
    return {
        "kl": kl.float(),
        "agree": (d.argmax(-1) == p.argmax(-1)).float(),
        "nll": -p.gather(1, t).view(-1).float(),
        "nll_dense": -d.gather(1, t).view(-1).float(),
    }


def seed_diversity(px: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How different the seeds of one class are (a collapse to one template per class shows as 0 / 1):
    seed_diversity = mean pixel RMSE (in [0, 1]) and seed_token_overlap = mean fraction of equal image
    tokens, over all pairs of images of the same class. Empty when no class has two images."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        by_class.setdefault(c, []).append(i)
    pairs = [(a, b) for idx in by_class.values() for k, a in enumerate(idx) for b in idx[k + 1 :]]
    if not pairs:
        return {}
    a, b = (torch.tensor(x) for x in zip(*pairs))
    rmse = (px[a].float() - px[b].float()).div(255).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return {
        "seed_diversity": float(rmse.double().mean()),
        "seed_token_overlap": float((codes[a] == codes[b]).double().mean()),
    }


def first_divergence(codes: torch.Tensor, dense: torch.Tensor) -> float:
    """Mean index of the first token that differs from dense (block_size where none does)."""
    diff = codes != dense
    T = codes.shape[1]
    first = torch.where(diff.any(1), diff.float().argmax(1), torch.full((codes.shape[0],), T))
    return float(first.double().mean())
