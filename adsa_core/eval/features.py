"""Image features for the fidelity metrics and the real-image statistics an FID compares against.

Features come from the demo's EmojiClassifier (which also gives class logits for recognition accuracy)
or a local TorchScript network such as an Inception-v3 FID detector (never downloaded); the reference is
a folder of images or an .npz of images, feature rows or precomputed statistics.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..cli_common import one_line
from ..config import ConfigError
from .classifier import load_classifier
from .metrics import class_balance_weights, feature_stats

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
    """The EmojiClassifier (adsa_core.eval.classifier): penultimate features and class logits."""

    has_logits = True

    def __init__(self, path: str | Path, device: torch.device):
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
            # FID detectors ship as TorchScript (NVlabs' inception-2015-12-05.pt), which torch deprecates
            # with no loader to replace it: reading the file the user names is the point, so not a warning
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
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


# Reference statistics for FID


@dataclass
class Reference:
    mu: torch.Tensor
    sigma: torch.Tensor
    source: str  # what it was computed from, for the report
    n: int  # images (or feature rows) behind it; 0 when only statistics were given
    class_restricted: bool  # True when it covers exactly the evaluated classes, each weighed equally


def uint8_to_float(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot read reference {path}: {one_line(e)}") from None


def npz_images(z: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The images of a reference .npz: `images`, or `images_xz` + `shape` (tools/emoji_data.py); None if neither."""
    if "images" in z:
        return z["images"]
    if "images_xz" in z and "shape" in z:
        import lzma

        shape = tuple(int(n) for n in z["shape"])
        return np.frombuffer(lzma.decompress(z["images_xz"].tobytes()), dtype=np.uint8).reshape(shape)
    return None


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
            feats.append(extractor.features(uint8_to_float(arr)))
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
    images = npz_images(z)
    if images is None:
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
            [extractor.features(uint8_to_float(images[keep[i : i + batch]])) for i in range(0, len(keep), batch)]
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
