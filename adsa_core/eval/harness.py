"""The fidelity passes: which cache settings to compare (`plan_settings`), the evaluated images, and the
engine runs that produce one row of metrics per setting (`evaluate`) or per sampling candidate
(`evaluate_sampling`). Typed arguments only; adsa_core.eval.fidelity is the command line around them.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import torch

from ..cli import decode_images
from ..config import CacheConfig, ConfigError, GPTConfig, ResolvedCache
from ..engine.offline import run_requests
from ..engine.request import Finished, GenerationRequest, RequestStats
from ..images import to_uint8
from ..loading import LoadedModels
from ..sampling import SamplingParams
from .features import FeatureExtractor, Reference, batched
from .metrics import feature_stats, first_divergence, frechet_distance, seed_diversity, token_metrics


@dataclass(frozen=True)
class Setting:
    """One table row: a policy at a budget with its prefix n and local window m."""

    policy: str
    budget: int | float | None  # as given (tokens or fraction); None for dense
    prefix: int | None = None  # None: CacheConfig's default
    local: int | None = None

    @property
    def cache(self) -> CacheConfig:
        return CacheConfig(policy=self.policy, budget=self.budget, prefix=self.prefix, local=self.local)


def plan_settings(
    policies: list[str],
    budgets: list[int | float],
    gpt: GPTConfig,
    prefix: int | None = None,
    local: int | None = None,
    sweep_budget: int | float | list[int | float] | None = None,
    sweep_prefix: list[int] | None = None,
    sweep_local: list[int] | None = None,
) -> list[tuple[Setting, ResolvedCache]]:
    """dense first (it is the reference), then policy x budget, then the (n, m) sweep at each of `sweep_budget`
    (default: the middle budget); settings that resolve to the same cache appear once. (n, m) pairs that leave
    no room at a sweep budget are skipped there; anything else impossible raises ConfigError."""
    out: list[tuple[Setting, ResolvedCache]] = []
    seen: set[tuple] = set()

    def add(s: Setting) -> None:
        r = s.cache.resolve(gpt)
        # window evicts the oldest non-prefix slot whatever m is (m only has to fit): same cache
        key = (
            ("dense",)
            if r.policy == "dense"
            else (r.policy, r.budget, r.prefix, None if r.policy == "window" and r.evicts else r.local)
        )
        if key not in seen:
            seen.add(key)
            out.append((s, r))

    add(Setting("dense", None))
    sparse = [p for p in policies if p != "dense"]
    for policy, budget in product(sparse, budgets):
        add(Setting(policy, budget, prefix, local))
    if sweep_prefix or sweep_local:
        if sweep_budget is None:
            sweep_budget = budgets[len(budgets) // 2]
        sweep_budgets = sweep_budget if isinstance(sweep_budget, list) else [sweep_budget]
        for b, policy, n, m in product(sweep_budgets, sparse, sweep_prefix or [prefix], sweep_local or [local]):
            try:
                add(Setting(policy, b, n, m))
            except ConfigError:
                if len(sweep_budgets) == 1 and len(sweep_prefix or [0]) * len(sweep_local or [0]) == 1:
                    raise  # a single requested sweep point that cannot work: say so
    return out


@dataclass
class ImageSet:
    """The evaluated images: labels[i] with seeds[i], ordered class-major."""

    labels: torch.Tensor  # (N,) int64
    seeds: torch.Tensor  # (N,) int64

    @classmethod
    def make(cls, classes: list[int], n_seeds: int, seed0: int = 0) -> ImageSet:
        labels = torch.tensor([c for c in classes for _ in range(n_seeds)], dtype=torch.long)
        seeds = torch.tensor([seed0 + s for _ in classes for s in range(n_seeds)], dtype=torch.long)
        return cls(labels, seeds)

    def grid_order(self, limit: int) -> list[int]:
        """Up to `limit` image indices, first seed of every class before second seeds."""
        order = sorted(range(len(self.labels)), key=lambda i: (int(self.seeds[i]), i))
        return order[:limit]


@dataclass
class Options:
    batch_size: int = 16  # images in flight in the engine (the run's waves: requests / batch_size)
    grid_max: int = 16  # images (columns) in grid.png
    feature_batch: int = 64
    dense_check: bool = True  # force dense's own tokens through the dense cache too (KL must be 0)
    kv_cache_dtype: str = "auto"  # every setting's K/V storage (dense included): "auto" or "fp8"


def _run(models: LoadedModels, reqs: list[GenerationRequest], opts: Options, on_finished, progress) -> None:
    """One engine pass. No spilling: the harness never reads spilled K/V (it does not change the outputs)."""
    run_requests(models, reqs, opts.batch_size, on_finished, progress, spill_limit_bytes=0,
                 kv_cache_dtype=opts.kv_cache_dtype)
    if models.device.type == "cuda":  # the next pass's engine sizes its pool from free memory
        gc.collect()
        torch.cuda.empty_cache()


def _mean(x: list[torch.Tensor]) -> float:
    return float(torch.cat([t.reshape(-1) for t in x]).double().mean()) if x else float("nan")


def evaluate(
    models: LoadedModels,
    settings: list[tuple[Setting, ResolvedCache]],
    images: ImageSet,
    sampling: SamplingParams,
    opts: Options,
    extractor: FeatureExtractor | None = None,
    classifier: FeatureExtractor | None = None,
    reference: Reference | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Rows of metrics, one per setting (dense first), and uint8 grid images per setting label.

    Pass 1 samples every image with the dense cache (keeping its log-probs) and, beside it, with every
    other setting (free-running, same seeds). Pass 2 forces the dense tokens through every setting's
    cache (dense's too, a check that forcing is exact, unless `opts.dense_check` is off).
    """
    gpt = models.gpt_config
    T, cls_tokens = gpt.block_size, gpt.cls_token_num
    n = len(images.seeds)
    grid_idx = images.grid_order(opts.grid_max)
    assert settings[0][1].policy == "dense"
    base = [
        GenerationRequest(condition=int(images.labels[i]), seed=int(images.seeds[i]), sampling=sampling)
        for i in range(n)
    ]
    dense_codes = torch.zeros(n, T, dtype=torch.long)
    dense_lp: list[torch.Tensor | None] = [None] * n
    per: list[list[dict[str, torch.Tensor] | None]] = [[None] * n for _ in settings]
    free_codes = [torch.zeros(n, T, dtype=torch.long) for _ in settings]
    free_stats: list[list[RequestStats | None]] = [[None] * n for _ in settings]

    # Pass 1: request j is image j % n of setting j // n (setting 0 = dense, with log-probs).
    reqs = [
        dataclasses.replace(r, cache=setting.cache, want_logits=s == 0)
        for s, (setting, _) in enumerate(settings)
        for r in base
    ]

    dev = models.device  # log-probs are compared where the model runs (a GPU does it in microseconds)

    def on_free(j: int, ev: Finished) -> None:
        s, i = divmod(j, n)
        free_codes[s][i], free_stats[s][i] = ev.codes.cpu(), ev.stats
        if s == 0:
            dense_codes[i] = free_codes[0][i]
            dense_lp[i] = ev.logprobs.to(dev) if ev.logprobs is not None else None

    _run(models, reqs, opts, on_free, progress)

    # Pass 2: the dense tokens through every setting's cache; compared as soon as each finishes, so
    # only the dense log-probs stay in memory.
    forced_settings = [s for s in range(len(settings)) if s > 0 or opts.dense_check]
    reqs = [
        dataclasses.replace(r, cache=settings[s][0].cache, forced_tokens=dense_codes[i], want_logits=True)
        for s in forced_settings
        for i, r in enumerate(base)
    ]

    def on_forced(j: int, ev: Finished) -> None:
        s, i = forced_settings[j // n], j % n
        assert ev.logprobs is not None and dense_lp[i] is not None
        m = token_metrics(dense_lp[i], ev.logprobs.to(dev), dense_codes[i])
        per[s][i] = {k: v.cpu() for k, v in m.items()}

    _run(models, reqs, opts, on_forced, progress)
    if not opts.dense_check:  # dense against itself, by definition
        per[0] = [
            {k: v.cpu() for k, v in token_metrics(lp, lp, dense_codes[i]).items()}  # type: ignore[arg-type]
            for i, lp in enumerate(dense_lp)
        ]
    dense_lp.clear()  # (N, T, V) log-probs: free them before the image metrics
    dense_stats = free_stats[0]

    dense_px = dense_feats = dense_correct = None
    if models.vq is not None:
        dense_px = pixels(models, dense_codes, opts.batch_size)
    dense_kv_bytes = sum(st.kv_bytes for st in dense_stats if st is not None) / n
    rows: list[dict] = []
    grids: dict[str, torch.Tensor] = {}
    for s, (setting, resolved) in enumerate(settings):
        is_dense = resolved.policy == "dense"
        metrics = [m for m in per[s] if m is not None]
        stats = [st for st in free_stats[s] if st is not None]
        assert len(metrics) == n and len(stats) == n
        evicting = torch.arange(T) + cls_tokens > resolved.budget  # steps whose cache holds < all tokens
        codes = free_codes[s]
        row: dict = {
            "policy": resolved.policy,
            "budget": setting.budget,
            "budget_tokens": resolved.budget,
            "budget_fraction": round(resolved.budget / resolved.seq_len, 4),
            "prefix": resolved.prefix,
            "local": resolved.local,
            "seq_len": resolved.seq_len,
            "kl": _mean([m["kl"] for m in metrics]),
            "kl_evicting_steps": _mean([m["kl"][evicting] for m in metrics]) if evicting.any() else 0.0,
            "top1_agree": _mean([m["agree"] for m in metrics]),
            "nll": _mean([m["nll"] for m in metrics]),
            "nll_dense": _mean([m["nll_dense"] for m in metrics]),
            "token_agree": float((codes == dense_codes).double().mean()),
            "first_diverging_token": first_divergence(codes, dense_codes),
            "peak_kv_tokens": max(st.peak_kv_tokens for st in stats),
            "kv_bytes": sum(st.kv_bytes for st in stats) / n,
            "evictions_per_image": sum(st.evictions for st in stats) / n,
        }
        row["kv_bytes_ratio"] = row["kv_bytes"] / dense_kv_bytes if dense_kv_bytes else None
        if models.vq is not None:
            px = dense_px if is_dense else pixels(models, codes, opts.batch_size)
            assert dense_px is not None and px is not None
            mse = (px.float() - dense_px.float()).div(255).pow(2).mean(dim=(1, 2, 3))  # (N,)
            mean_mse = float(mse.double().mean())
            row["pixel_mse"] = mean_mse
            row["psnr_db"] = 10 * math.log10(1.0 / mean_mse) if mean_mse > 0 else math.inf
            grids[_label(setting, resolved)] = px[grid_idx]
            metrics, feats, correct = image_metrics(px, codes, images, opts, extractor, classifier, reference)
            row.update(metrics)
            if is_dense:
                dense_feats, dense_correct = feats, correct
            if feats is not None and dense_feats is not None:
                row["fid_to_dense"] = frechet_distance(*feature_stats(feats), *feature_stats(dense_feats))
            if correct is not None and dense_correct is not None:
                # paired over the same (class, seed) images: far tighter than two independent binomials
                d = correct.double() - dense_correct.double()
                row["recognition_delta"] = float(d.mean())
                row["recognition_delta_se"] = float(d.std() / math.sqrt(n)) if n > 1 else None
        rows.append(row)
    return rows, grids


def image_metrics(
    px: torch.Tensor,
    codes: torch.Tensor,
    images: ImageSet,
    opts: Options,
    extractor: FeatureExtractor | None,
    classifier: FeatureExtractor | None,
    reference: Reference | None,
) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """Recognition (with its binomial standard error), FID against the reference and seed diversity of one
    setting's images px (N, H, W, 3) uint8 / codes (N, T). Returns (metrics, features or None, per-image
    recognition hits or None)."""
    out: dict = {}
    n = px.shape[0]
    images_f = px.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the PNG pixels, back to [-1, 1]
    correct = feats = None
    if classifier is not None:
        logits = batched(classifier.logits, images_f, opts.feature_batch)
        correct = logits.argmax(-1) == images.labels
        p = float(correct.double().mean())
        out["recognition_acc"] = p
        out["recognition_se"] = math.sqrt(p * (1 - p) / n)
    if extractor is not None and reference is not None:
        feats = batched(extractor.features, images_f, opts.feature_batch)
        if feats.shape[1] != reference.mu.numel():
            raise ConfigError(
                f"reference statistics are {reference.mu.numel()}-d but {extractor.name} "
                f"gives {feats.shape[1]}-d features"
            )
        out["fid"] = frechet_distance(*feature_stats(feats), reference.mu, reference.sigma)
    out.update(seed_diversity(px, codes, images.labels))
    return out, feats, correct


def evaluate_sampling(
    models: LoadedModels,
    candidates: list[SamplingParams],
    images: ImageSet,
    opts: Options,
    extractor: FeatureExtractor | None = None,
    classifier: FeatureExtractor | None = None,
    reference: Reference | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Dense-cache images under each sampling candidate (one engine pass, every candidate in the same batches):
    recognition, FID and seed diversity per candidate, and grid images per candidate label."""
    n, T = len(images.seeds), models.gpt_config.block_size
    dense = CacheConfig("dense", None)
    reqs = [
        GenerationRequest(condition=int(images.labels[i]), seed=int(images.seeds[i]), sampling=sp, cache=dense)
        for sp in candidates
        for i in range(n)
    ]
    codes = [torch.zeros(n, T, dtype=torch.long) for _ in candidates]

    def on_done(j: int, ev: Finished) -> None:
        s, i = divmod(j, n)
        codes[s][i] = ev.codes.cpu()

    _run(models, reqs, opts, on_done, progress)
    rows, grids = [], {}
    grid_idx = images.grid_order(opts.grid_max)
    for sp, c in zip(candidates, codes):
        row: dict = {"sampling": dataclasses.asdict(sp), "label": _sampling_label(sp)}
        if models.vq is not None:
            px = pixels(models, c, opts.batch_size)
            grids[row["label"]] = px[grid_idx]
            row.update(image_metrics(px, c, images, opts, extractor, classifier, reference)[0])
        rows.append(row)
    return rows, grids


def _sampling_label(sp: SamplingParams) -> str:
    parts = [f"cfg {sp.cfg_scale:g}", f"T {sp.temperature:g}"]
    if sp.top_k:
        parts.append(f"top-k {sp.top_k}")
    if sp.top_p < 1:
        parts.append(f"top-p {sp.top_p:g}")
    if sp.greedy:
        parts.append("greedy")
    return ", ".join(parts)


def pixels(models: LoadedModels, codes: torch.Tensor, batch: int) -> torch.Tensor:
    """codes (N, T) -> uint8 (N, H, W, 3), exactly the pixels adsa-generate writes as PNG."""
    assert models.vq is not None
    return torch.cat([to_uint8(x) for x in decode_images(models.vq, codes, batch)])


def _label(s: Setting, r: ResolvedCache) -> str:
    if r.policy == "dense":
        return "dense"
    m = f" m={r.local}" if r.policy not in ("dense", "window") else ""  # window does not depend on m
    return f"{r.policy} {r.budget / r.seq_len:.3g} ({r.budget}) n={r.prefix}{m}"
