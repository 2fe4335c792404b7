"""adsa-fidelity: how far a sparse KV cache (adsa, window) moves a LlamaGen model from the dense cache.

    adsa-fidelity --policies dense,adsa,window --budgets 0.5,0.25,0.1667 --classes 0-23 --seeds 4 --out fid/
    adsa-fidelity --gpt-model GPT-XL --gpt-ckpt c2i_XL_384.pt --vq-ckpt vq_ds16_c2i.pt --classes 207,360 \\
        --inception pt_inception.pt --reference-images imagenet_ref.npz --out fid_xl/

For every (class, seed) image and every cache setting (policy, budget, prefix n, local m):
  (a) teacher-forced: the dense sample's tokens are forced through the policy's cache; per token we
      compare the policy's CFG-guided next-token distribution with dense's: KL(dense || policy),
      top-1 agreement and the NLL of the forced token;
  (b) free-running: the same seed sampled under the policy, decoded to pixels: token and pixel
      agreement with the dense image, recognition accuracy and FID on a classifier's (or a local
      Inception TorchScript's) features against real images.
Writes fidelity.json, fidelity.md (one table row per setting) and grid.png into --out.
Metrics are explained in docs/FIDELITY.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .cli import decode_images
from .cli_common import (
    DTYPE_CHOICES,
    Parser,
    UsageError,
    add_model_args,
    budget_arg,
    int_list,
    model_spec_from_args,
    one_line,
    positive_int,
    run_main,
)
from .config import CacheConfig, ConfigError, GPTConfig, ResolvedCache
from .engine.offline import run_requests
from .engine.request import (
    Finished,
    GenerationRequest,
    RequestStats,
)
from .images import to_uint8
from .kv.policy import policy_names
from .kv.pool import KV_CACHE_DTYPES
from .loading import DEMO_DIR, LoadedModels, ModelSpec, load_models
from .sampling import SamplingParams

PROG = "adsa-fidelity"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Teacher-forced comparison


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


# ---------------------------------------------------------------------------------------------
# Image features: the demo classifier, or a local Inception TorchScript


class FeatureExtractor:
    """features(images (B, 3, H, W) in [-1, 1]) -> (B, D) fp32; logits() only for the classifier."""

    name = "features"
    has_logits = False

    def features(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ClassifierFeatures(FeatureExtractor):
    """The EmojiClassifier (adsa_core.classifier): penultimate features and class logits."""

    has_logits = True

    def __init__(self, path: str | Path, device: torch.device):
        from .classifier import load_classifier

        self.model = load_classifier(path, device=device)
        self.size = self.model.config.image_size
        self.device = device
        self.name = f"classifier:{Path(path).name} (penultimate, {self.model.config.feature_dim}-d)"

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32).clamp(-1, 1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(self._prep(images)).float().cpu()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self._prep(images)).float().cpu()


class TorchScriptFeatures(FeatureExtractor):
    """A local TorchScript feature network (e.g. an Inception-v3 FID detector); never downloads.

    Called as `model(x, return_features=True)` when it takes that keyword (NVlabs'
    inception-2015-12-05.pt), else `model(x)`. x is uint8 (0..255), float in [0, 1] or in [-1, 1]
    (`input_range`), resized to `size` px first when given. Outputs (B, D) or (B, D, 1, 1).
    """

    def __init__(self, path: str | Path, device: torch.device, input_range: str = "uint8", size: int | None = None):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--inception file not found: {path}")
        try:
            self.model = torch.jit.load(str(p), map_location=device).eval()
        except Exception as e:  # noqa: BLE001 - any load problem is one clear line
            raise ConfigError(f"--inception {path} is not a TorchScript file: {one_line(e)}") from None
        self.device, self.input_range, self.size = device, input_range, size
        self.name = f"torchscript:{p.name}"
        self._kw: bool | None = None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32).clamp(-1, 1)
        if self.size and (x.shape[-1] != self.size or x.shape[-2] != self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if self.input_range == "uint8":
            x = (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8)
        elif self.input_range == "float01":
            x = (x + 1) / 2
        out = None
        if self._kw is not False:
            try:
                out = self.model(x, return_features=True)
                self._kw = True
            except (RuntimeError, TypeError):
                if self._kw:
                    raise
                self._kw = False
        if out is None:
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().reshape(out.shape[0], -1).cpu()


def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch]) for i in range(0, images.shape[0], batch)])


# ---------------------------------------------------------------------------------------------
# Reference statistics for FID


@dataclass
class Reference:
    mu: torch.Tensor
    sigma: torch.Tensor
    source: str  # what it was computed from, for the report
    n: int  # images (or feature rows) behind it; 0 when only statistics were given
    class_restricted: bool  # True when it covers exactly the evaluated classes, each weighed equally


def _uint8_to_float(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot read reference {path}: {one_line(e)}") from None


def load_reference(
    path: str | Path,
    extractor: FeatureExtractor,
    classes: list[int],
    batch: int,
    model_classes: list[dict] | None = None,
) -> Reference:
    """Reference statistics from a folder of images or an .npz holding one of:
    - `mu`/`sigma` (or `mean`/`cov`): precomputed statistics, used as they are;
    - `features` (N, D) [+ `labels`]: feature rows of real images;
    - `images` (N, H, W, 3) uint8, or `images_xz` + `shape` (tools/emoji_data.py) [+ `labels`].
    With labels, only the evaluated classes are kept and every class weighs the same. An .npz may also
    hold `classes` (JSON text, [{"id", "name", "emoji"}], as tools/emoji_data.py writes): then its
    labels must mean the model's classes (checked for the evaluated ones).
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if len(files) < 2:
            raise ConfigError(f"--reference-images {path}: fewer than 2 images in the folder")
        feats = []
        for i in range(0, len(files), batch):
            arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[i : i + batch]])
            feats.append(extractor.features(_uint8_to_float(arr)))
        mu, sigma = feature_stats(torch.cat(feats))
        return Reference(mu, sigma, f"{p} ({len(files)} images, all used)", len(files), False)
    if not p.is_file():
        raise ConfigError(f"--reference-images not found: {path}")
    z = _read_npz(p)
    for m, s in (("mu", "sigma"), ("mean", "cov")):
        if m in z and s in z:
            return Reference(
                torch.from_numpy(z[m]).double().reshape(-1),
                torch.from_numpy(z[s]).double(),
                f"{p} (precomputed statistics, all classes)",
                int(z.get("n", np.zeros(())).item()),
                False,
            )
    labels = torch.from_numpy(z["labels"].astype(np.int64)) if "labels" in z else None
    if "classes" in z and model_classes is not None:
        _check_classes(json.loads(str(z["classes"])), model_classes, classes, p)
    if "features" in z:
        rows = torch.from_numpy(z["features"].astype(np.float32))
        return _stats_from_rows(rows, labels, classes, p, "feature rows")
    if "images" in z:
        images = z["images"]
    elif "images_xz" in z and "shape" in z:
        import lzma

        shape = tuple(int(n) for n in z["shape"])
        images = np.frombuffer(lzma.decompress(z["images_xz"].tobytes()), dtype=np.uint8).reshape(shape)
    else:
        raise ConfigError(
            f"--reference-images {path}: expected mu/sigma, features or images arrays, "
            f"found {', '.join(sorted(z)) or 'none'}"
        )
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConfigError(
            f"--reference-images {path}: images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}"
        )
    keep = np.arange(images.shape[0])
    if labels is not None:
        keep = np.nonzero(np.isin(labels.numpy(), np.asarray(classes)))[0]
        labels = labels[torch.from_numpy(keep)]
    feats = (
        torch.cat(
            [extractor.features(_uint8_to_float(images[keep[i : i + batch]])) for i in range(0, len(keep), batch)]
        )
        if len(keep)
        else torch.zeros(0, 1)
    )
    return _stats_from_rows(feats, labels, classes, p, "images", restricted=True)


def _check_classes(ref: list[dict], model: list[dict], classes: list[int], path: Path) -> None:
    key = lambda c: (c.get("emoji"), c.get("name"))
    for c in classes:
        if c >= len(ref) or key(ref[c]) != key(model[c]):
            got = ref[c] if c < len(ref) else "nothing"
            raise ConfigError(
                f"--reference-images {path}: label {c} is {got}, the model's class {c} is {model[c]} "
                "(reference made for another class list)"
            )


def _stats_from_rows(
    rows: torch.Tensor, labels: torch.Tensor | None, classes: list[int], path: Path, what: str, restricted: bool = False
) -> Reference:
    if labels is None:
        mu, sigma = feature_stats(rows)
        return Reference(mu, sigma, f"{path} ({rows.shape[0]} {what}, no labels: all used)", rows.shape[0], False)
    if not restricted:
        mask = torch.isin(labels, torch.tensor(classes))
        rows, labels = rows[mask], labels[mask]
    missing = sorted(set(classes) - set(labels.tolist()))
    if rows.shape[0] < 2:
        raise ConfigError(f"--reference-images {path}: fewer than 2 reference {what} for the evaluated classes")
    mu, sigma = feature_stats(rows, class_balance_weights(labels))
    note = f"; no reference for classes {missing[:10]}{'...' if len(missing) > 10 else ''}" if missing else ""
    return Reference(
        mu,
        sigma,
        f"{path} ({rows.shape[0]} {what} of the {len(classes) - len(missing)} evaluated classes, class-balanced{note})",
        rows.shape[0],
        True,
    )


# ---------------------------------------------------------------------------------------------
# Settings and the run (no argparse below this line)


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


def _round(x: float | None, digits: int = 6) -> float | None:
    """`digits` significant digits for the JSON; None for NaN and infinities (JSON has neither)."""
    if x is None or math.isnan(x) or math.isinf(x):
        return None
    return float(f"{x:.{digits}g}")


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
        dense_px = _pixels(models, dense_codes, opts.batch_size)
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
            "first_diverging_token": _first_divergence(codes, dense_codes),
            "peak_kv_tokens": max(st.peak_kv_tokens for st in stats),
            "kv_bytes": sum(st.kv_bytes for st in stats) / n,
            "evictions_per_image": sum(st.evictions for st in stats) / n,
        }
        row["kv_bytes_ratio"] = row["kv_bytes"] / dense_kv_bytes if dense_kv_bytes else None
        if models.vq is not None:
            px = dense_px if is_dense else _pixels(models, codes, opts.batch_size)
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
            px = _pixels(models, c, opts.batch_size)
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


def _first_divergence(codes: torch.Tensor, dense: torch.Tensor) -> float:
    """Mean index of the first token that differs from dense (block_size where none does)."""
    diff = codes != dense
    T = codes.shape[1]
    first = torch.where(diff.any(1), diff.float().argmax(1), torch.full((codes.shape[0],), T))
    return float(first.double().mean())


def _pixels(models: LoadedModels, codes: torch.Tensor, batch: int) -> torch.Tensor:
    """codes (N, T) -> uint8 (N, H, W, 3), exactly the pixels adsa-generate writes as PNG."""
    assert models.vq is not None
    return torch.cat([to_uint8(x) for x in decode_images(models.vq, codes, batch)])


def _label(s: Setting, r: ResolvedCache) -> str:
    if r.policy == "dense":
        return "dense"
    m = f" m={r.local}" if r.policy == "adsa" else ""  # window does not depend on m
    return f"{r.policy} {r.budget / r.seq_len:.3g} ({r.budget}) n={r.prefix}{m}"


# ---------------------------------------------------------------------------------------------
# Outputs


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def save_grid(grids: dict[str, torch.Tensor], col_labels: list[str], path: Path, pad: int = 2) -> Image.Image:
    """Rows = settings (label at the left), columns = images (label on top)."""
    first = next(iter(grids.values()))
    n, H, W, _ = first.shape
    scale = 1 if H >= 64 else math.ceil(64 / H)  # tiny test images: upscale so labels fit
    H, W = H * scale, W * scale
    font = _font(max(10, min(14, W // 9)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda t: int(probe.textlength(t, font=font))
    left = 8 + max(text_w(lbl) for lbl in grids)
    top = 20
    img = Image.new("RGB", (left + n * (W + pad) + pad, top + len(grids) * (H + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    for c, lbl in enumerate(col_labels[:n]):
        while lbl and text_w(lbl) > W:
            lbl = lbl[:-1]
        draw.text((left + pad + c * (W + pad), 3), lbl, fill="black", font=font)
    for r, (lbl, px) in enumerate(grids.items()):
        y = top + pad + r * (H + pad)
        draw.text((4, y + H // 2 - 7), lbl, fill="black", font=font)
        for c in range(px.shape[0]):
            tile = Image.fromarray(px[c].numpy())
            if scale > 1:
                tile = tile.resize((W, H), Image.NEAREST)
            img.paste(tile, (left + pad + c * (W + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def _fmt(x, spec: str = ".4f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def _fmt_fid(x: float | None) -> str:
    return _fmt(x, ".2f" if x is not None and x >= 10 else ".3f")


def _pm(x: float | None, se: float | None, spec: str = ".3f") -> str:
    """x ± se (the standard error), or x alone when se is unknown."""
    if x is None:
        return "–"
    return f"{x:{spec}} ± {se:{spec}}" if se is not None else format(x, spec)


def _signed_pm(x: float | None, se: float | None) -> str:
    return "–" if x is None else (f"{x:+.3f} ± {se:.3f}" if se is not None else f"{x:+.3f}")


def markdown_table(report: dict) -> str:
    head = (
        "| policy | budget (fraction / tokens) | n | m | KL(dense‖policy) | top-1 agree | NLL | recognition acc "
        "| Δ recognition vs dense | FID | FID to dense | token agree vs dense | PSNR vs dense (dB) "
        "| peak KV tokens | KV bytes vs dense |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in report["rows"]:
        dense = r["policy"] == "dense"
        lines.append(
            " | ".join(
                [
                    f"| {r['policy']}",
                    f"{r['budget_fraction']:.3f} / {r['budget_tokens']}",
                    "–" if dense else str(r["prefix"]),
                    str(r["local"]) if r["policy"] == "adsa" else "–",
                    _fmt(r["kl"]),
                    _fmt(r["top1_agree"], ".3f"),
                    _fmt(r["nll"], ".3f"),
                    _pm(r.get("recognition_acc"), r.get("recognition_se")),
                    "–" if dense else _signed_pm(r.get("recognition_delta"), r.get("recognition_delta_se")),
                    _fmt_fid(r.get("fid")),
                    _fmt_fid(r.get("fid_to_dense")),
                    _fmt(r["token_agree"], ".3f"),
                    "∞" if r.get("pixel_mse") == 0 else _fmt(r.get("psnr_db"), ".2f"),
                    str(r["peak_kv_tokens"]),
                    _fmt(r["kv_bytes_ratio"], ".3f"),
                ]
            )
            + " |"
        )
    notes = [
        "",
        *_run_notes(report),
        "n = prefix (never-evicted first positions, condition token included), m = local window (window keeps "
        "the prefix and the most recent budget - n tokens: m does not change it). "
        "KL, top-1 agreement and NLL are teacher-forced on the dense samples (mean per token); NLL of dense "
        f"itself: {_fmt(report['rows'][0]['nll'], '.3f')}. Token agreement, PSNR, recognition and FID are "
        "free-running with the same seeds. Recognition: ± its binomial standard error; Δ vs dense: the paired "
        "difference over the same images ± its standard error.",
    ]
    notes += [f"Note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines + notes) + "\n"


def sampling_markdown(report: dict) -> str:
    head = "| sampling | recognition acc | FID | seed diversity (pixel RMSE) | seed token overlap |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in report["rows"]:
        label = r["label"] + (" (default)" if r.get("is_default") else "")
        lines.append(
            " | ".join(
                [
                    f"| {label}",
                    _pm(r.get("recognition_acc"), r.get("recognition_se")),
                    _fmt_fid(r.get("fid")),
                    _fmt(r.get("seed_diversity"), ".4f"),
                    _fmt(r.get("seed_token_overlap"), ".3f"),
                ]
            )
            + " |"
        )
    notes = [
        "",
        *_run_notes(report),
        "Every candidate samples the same (class, seed) images with the dense cache. Recognition ± its binomial "
        "standard error. Seed diversity: mean pixel RMSE between two seeds of one class (0: one template); "
        "seed token overlap: fraction of equal tokens between them (1: identical images).",
    ]
    notes += [f"Note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines + notes) + "\n"


def _run_notes(meta: dict) -> list[str]:
    return [
        f"Model `{meta['model']}` (GPT weights sha256 {meta.get('gpt_ckpt_sha256') or '–'}; {meta['image_size']} px, "
        f"{meta['block_size']} image tokens, sequence {meta['seq_len']} KV tokens), {meta['n_images']} images: "
        f"classes {_short(meta['classes'])} x {meta['seeds_per_class']} seeds from seed {meta['first_seed']}; "
        f"sampling {meta['sampling']}.",
        f"Device: {meta['device']}; dtype {meta['dtype']}; {meta['date']}; {meta['seconds']} s.",
        f"FID features: {meta.get('features') or '–'}; reference: {meta.get('reference') or '–'}.",
    ]


def _gpt_ckpt_path(spec: ModelSpec) -> Path | None:
    if spec.is_demo:
        return DEMO_DIR / json.loads((DEMO_DIR / "config.json").read_text())["gpt_ckpt"]
    return Path(spec.gpt_ckpt) if spec.gpt_ckpt else None


def _sha256(path: Path | None, limit: int = 1 << 30) -> str | None:
    """First 16 hex digits of the file's SHA-256 (which weights the numbers belong to); None past `limit`."""
    if path is None or not path.is_file() or path.stat().st_size > limit:
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _short(xs: list[int]) -> str:
    return str(xs) if len(xs) <= 12 else f"[{', '.join(map(str, xs[:10]))}, ... ({len(xs)} classes)]"


# ---------------------------------------------------------------------------------------------
# Command line


def _policies(text: str) -> list[str]:
    items = [t for t in text.replace(" ", "").split(",") if t]
    bad = [t for t in items if t not in policy_names()]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(policy_names())}"
        )
    return items


def _budgets(text: str) -> list[int | float | None]:
    out = [budget_arg(t) for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError("no budgets given")
    return out


_SAMPLING_KEYS = {
    "cfg": "cfg_scale",
    "cfg_scale": "cfg_scale",
    "t": "temperature",
    "temperature": "temperature",
    "top_k": "top_k",
    "k": "top_k",
    "top_p": "top_p",
    "p": "top_p",
}


def _sampling_list(text: str) -> list[dict]:
    """'cfg=2,t=0.9;cfg=1.5,top_k=100' -> [{'cfg_scale': 2.0, 'temperature': 0.9}, {...}] (unset: the default)."""
    out = []
    for cand in text.split(";"):
        if not cand.strip():
            continue
        d: dict = {}
        for kv in cand.split(","):
            k, sep, v = kv.strip().partition("=")
            key = _SAMPLING_KEYS.get(k.strip())
            if not sep or key is None:
                raise argparse.ArgumentTypeError(
                    f"bad sampling setting {kv.strip()!r}; use e.g. "
                    "cfg=2,t=0.9,top_k=100,top_p=0.95 (candidates separated by ;)"
                )
            try:
                d[key] = int(v) if key == "top_k" else float(v)
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad value in sampling setting {kv.strip()!r}") from None
        out.append(d)
    if not out:
        raise argparse.ArgumentTypeError("no sampling candidates given")
    return out


def _batch(text: str) -> int | None:
    return None if text == "auto" else positive_int(text)


def _classes(text: str) -> list[int]:
    """'0,5,9', inclusive ranges '0-23', strided ranges '0-1892:30', mixed."""
    out: list[int] = []
    for t in text.replace(" ", "").split(","):
        if "-" in t[1:]:
            rng, _, step = t.partition(":")
            a, _, b = rng.partition("-")
            try:
                lo, hi, st = int(a), int(b), int(step or 1)
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad class range {t!r}") from None
            if hi < lo or st < 1:
                raise argparse.ArgumentTypeError(f"empty class range {t!r}")
            out.extend(range(lo, hi + 1, st))
        elif t:
            out.extend(int_list(t))
    if not out:
        raise argparse.ArgumentTypeError("no classes given")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError("a class is listed twice")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Fidelity of sparse KV-cache policies against the dense cache "
        "(teacher-forced KL/agreement/NLL; free-running recognition, FID, PSNR).",
    )
    add_model_args(p)
    e = p.add_argument_group("what to compare")
    e.add_argument(
        "--policies",
        type=_policies,
        default=["dense", "adsa", "window"],
        help="comma-separated, from dense, adsa, window (default all; dense always runs)",
    )
    e.add_argument(
        "--budgets",
        type=_budgets,
        default=[0.5, 0.25, 1 / 6],
        metavar="B,B,...",
        help="KV budgets: fractions (0.25, 1/6) or token counts (64) (default 1/2, 1/4, 1/6)",
    )
    e.add_argument(
        "--kv-prefix",
        type=int,
        metavar="N",
        help="prefix n for the policy x budget rows "
        "(default: CacheConfig's, condition tokens + one image row, less at small budgets)",
    )
    e.add_argument(
        "--kv-local",
        type=int,
        metavar="M",
        help="local window m (default: CacheConfig's, two image rows, less at small budgets)",
    )
    e.add_argument("--sweep-prefix", type=int_list, metavar="N,N,...", help="extra rows: these prefixes ...")
    e.add_argument("--sweep-local", type=int_list, metavar="M,M,...", help="... x these local windows ...")
    e.add_argument(
        "--sweep-budget",
        type=_budgets,
        metavar="B,B,...",
        help="... at these budgets (default: the middle of --budgets); pairs that do not fit a budget are skipped",
    )
    e.add_argument(
        "--sampling-sweep",
        type=_sampling_list,
        metavar="SPEC;SPEC;...",
        help="instead of the policy table: dense images under each sampling candidate, e.g. "
        "'cfg=2;cfg=2,t=0.9;cfg=1.5,top_k=100' (unset keys: the default sampling, which is always "
        "measured too); writes sampling.json, sampling.md and grid.png",
    )
    e.add_argument(
        "--classes",
        type=_classes,
        metavar="C,C-C:S",
        help="class labels, e.g. 0,5,9 or 0-23 or 0-1892:30 (default: 8 spread over the model's)",
    )
    e.add_argument("--seeds", type=positive_int, default=2, metavar="N", help="seeds per class: SEED..SEED+N-1")
    e.add_argument("--seed", type=int, default=0, help="first seed (default 0)")

    s = p.add_argument_group("sampling (defaults: LlamaGen's, or the demo model's)")
    s.add_argument("--cfg-scale", type=float)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument(
        "--batch-size",
        type=_batch,
        default=None,
        metavar="N|auto",
        help="images in flight (default auto: 256 on cuda, 16 on cpu)",
    )
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    s.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="K/V storage of every row, dense included (fp8: e4m3); compare runs to see fp8's cost")

    f = p.add_argument_group("image metrics")
    f.add_argument(
        "--classifier",
        metavar="PATH",
        help="EmojiClassifier checkpoint for recognition accuracy and FID features (default: the demo model's)",
    )
    f.add_argument(
        "--reference-images",
        metavar="DIR|NPZ",
        help="real images for FID: a folder of images, or an "
        ".npz with images (+labels), features (+labels) or mu/sigma (default for the demo: its "
        "reference_stats.npz when shipped)",
    )
    f.add_argument(
        "--inception",
        metavar="PATH",
        help="local TorchScript feature network (e.g. Inception) for FID instead of the classifier; never downloaded",
    )
    f.add_argument(
        "--inception-input",
        choices=("uint8", "float01", "float11"),
        default="uint8",
        help="what the TorchScript takes (default uint8 0..255)",
    )
    f.add_argument("--inception-size", type=positive_int, metavar="PX", help="resize to PX first (default: no resize)")
    f.add_argument("--no-fid", action="store_true", help="skip FID")
    f.add_argument(
        "--no-dense-check",
        action="store_true",
        help="do not re-force dense's samples through the "
        "dense cache (its row is then 0 / 1 by definition; saves one pass of the images)",
    )

    o = p.add_argument_group("outputs")
    o.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="fidelity.json, fidelity.md, grid.png (with --sampling-sweep: sampling.json, sampling.md, grid.png)",
    )
    o.add_argument("--grid-max", type=positive_int, default=16, help="images per row in grid.png (default 16)")
    o.add_argument("--progress", action="store_true", help="progress bar on stderr even when not a TTY")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    spec = model_spec_from_args(a)
    overrides = {
        k: v
        for k, v in dict(cfg_scale=a.cfg_scale, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p).items()
        if v is not None
    }
    SamplingParams(**overrides)  # bad values fail before any weights load
    for cand in a.sampling_sweep or []:
        try:
            SamplingParams(**{**overrides, **cand})
        except ValueError as e:
            raise UsageError(f"--sampling-sweep: {e}") from None
    for path, flag in (
        (a.reference_images, "--reference-images"),
        (a.classifier, "--classifier"),
        (a.inception, "--inception"),
    ):
        if path and not Path(path).exists():
            raise UsageError(f"{flag} not found: {path}")
    return run_fidelity(spec, a, overrides, show_progress=a.progress or sys.stderr.isatty(), argv=argv)


def run_fidelity(
    spec: ModelSpec, a: argparse.Namespace, overrides: dict, show_progress: bool, argv: list[str] | None = None
) -> int:
    models = load_models(spec)
    gpt = models.gpt_config
    if gpt.model_type != "c2i":
        raise ConfigError(f"{models.name} is text-conditional; adsa-fidelity evaluates class-conditional models")
    classes = a.classes or sorted({round(i * gpt.num_classes / 8) for i in range(min(8, gpt.num_classes))})
    for c in classes:
        if not 0 <= c < gpt.num_classes:
            raise ConfigError(f"class {c} is outside 0..{gpt.num_classes - 1}")
    sweep_sampling = a.sampling_sweep is not None
    settings = (
        []
        if sweep_sampling
        else plan_settings(
            a.policies, a.budgets, gpt, a.kv_prefix, a.kv_local, a.sweep_budget, a.sweep_prefix, a.sweep_local
        )
    )
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    sampling = SamplingParams(**{**{k: v for k, v in models.sampling_defaults.items() if k in known}, **overrides})
    notes: list[str] = []

    # Recognition: the classifier given, or the demo's. FID features: Inception if given, else the classifier.
    clf_path = a.classifier
    if clf_path is None and spec.is_demo:
        meta = json.loads((DEMO_DIR / "config.json").read_text())
        if meta.get("classifier_ckpt") and (DEMO_DIR / meta["classifier_ckpt"]).is_file():
            clf_path = str(DEMO_DIR / meta["classifier_ckpt"])
    classifier = ClassifierFeatures(clf_path, models.device) if clf_path else None
    if classifier is None:
        notes.append("no classifier (--classifier): recognition accuracy skipped")
    elif classifier.model.config.num_classes != gpt.num_classes:
        raise ConfigError(
            f"the classifier knows {classifier.model.config.num_classes} classes, the model {gpt.num_classes}"
        )
    extractor: FeatureExtractor | None = (
        TorchScriptFeatures(a.inception, models.device, a.inception_input, a.inception_size)
        if a.inception
        else classifier
    )
    reference = None
    if models.vq is None:
        notes.append("no VQ decoder (--vq-ckpt): image metrics skipped")
    elif a.no_fid:
        notes.append("FID skipped (--no-fid)")
    elif extractor is None:
        notes.append("FID skipped: no feature network (give --classifier or --inception)")
    else:
        ref_path = a.reference_images
        if ref_path is None and spec.is_demo and not a.inception:
            shipped = DEMO_DIR / "reference_stats.npz"
            ref_path = str(shipped) if shipped.is_file() else None
        if ref_path is None:
            notes.append(
                "FID skipped: no reference (give --reference-images DIR|NPZ"
                + ("; the demo assets ship no reference_stats.npz" if spec.is_demo else "")
                + ")"
            )
        else:
            reference = load_reference(ref_path, extractor, classes, 64, models.classes)
            if not reference.class_restricted:
                notes.append(
                    "FID reference is not restricted to the evaluated classes: compare FIDs between "
                    "rows, not with other runs"
                )
    images = ImageSet.make(classes, a.seeds, a.seed)
    batch = a.batch_size or (256 if models.device.type == "cuda" else 16)
    opts = Options(batch_size=batch, grid_max=a.grid_max, dense_check=not a.no_dense_check,
                   kv_cache_dtype=a.kv_cache_dtype)

    if sweep_sampling:
        candidates = [dataclasses.replace(sampling, **cand) for cand in a.sampling_sweep]
        if sampling not in candidates:  # the default is always measured: candidates are judged against it
            candidates.insert(0, sampling)
        n_runs = len(candidates)
    else:
        n_runs = 2 * len(settings) - (0 if opts.dense_check else 1)  # requests per image
    bar = tqdm(
        total=n_runs * len(images.seeds) * gpt.block_size,
        unit="tok",
        file=sys.stderr,
        desc=PROG,
        disable=not show_progress,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    with bar:
        if sweep_sampling:
            rows, grids = evaluate_sampling(
                models, candidates, images, opts, extractor, classifier, reference, bar.update
            )
            for r in rows:
                r["is_default"] = r["sampling"] == dataclasses.asdict(sampling)
        else:
            rows, grids = evaluate(
                models, settings, images, sampling, opts, extractor, classifier, reference, bar.update
            )
    seconds = time.perf_counter() - t0

    device = str(models.device)
    if models.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(models.device)})"
    report = {
        "command": " ".join([PROG, *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "dtype": str(models.dtype).removeprefix("torch."),
        "kv_cache_dtype": opts.kv_cache_dtype,
        "torch": torch.__version__,
        "model": models.name,
        "gpt_ckpt_sha256": _sha256(_gpt_ckpt_path(spec)),
        "image_size": models.image_size,
        "block_size": gpt.block_size,
        "seq_len": gpt.seq_len,
        "grid_size": gpt.grid_size,
        "classes": classes,
        "class_names": [models.classes[c]["name"] for c in classes] if models.classes else None,
        "seeds_per_class": a.seeds,
        "first_seed": a.seed,
        "n_images": len(images.seeds),
        "sampling": dataclasses.asdict(sampling),
        "batch_size": batch,
        "features": extractor.name if extractor is not None and reference is not None else None,
        "reference": reference.source if reference is not None else None,
        "seconds": round(seconds, 2),
        "notes": notes,
        "rows": [{k: (_round(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "sampling" if sweep_sampling else "fidelity"
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / f"{name}.md").write_text(sampling_markdown(report) if sweep_sampling else markdown_table(report))
    if grids:
        idx = images.grid_order(opts.grid_max)
        names = report["class_names"]
        col = [
            f"{int(images.labels[i])}{' ' + names[classes.index(int(images.labels[i]))] if names else ''} "
            f"s{int(images.seeds[i])}"
            for i in idx
        ]
        save_grid(grids, col, out / "grid.png")
    if show_progress:
        what = f"{len(rows)} sampling candidates" if sweep_sampling else f"{len(rows)} settings"
        print(f"{PROG}: {what} x {len(images.seeds)} images in {seconds:.1f} s -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
