"""Turn a reference-image .npz (tools/emoji_data.py's format) into the demo classifier's feature rows.

adsa-fidelity's FID on the demo compares the classifier features of generated images with those of the real
renders. It accepts the renders themselves (`.device-carry/emoji.npz`, 22 MB) or their features (3 MB): the
features are what a device call can carry beside the repository (64 MiB in all), and the statistics come out
the same (labels kept: only the evaluated classes count, each class weighs the same).

    python tools/reference_features.py --images .device-carry/emoji.npz --out .device-carry/emoji_features.npz
    adsa-fidelity ... --reference-images .device-carry/emoji_features.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adsa_core.eval.features import ClassifierFeatures, npz_images, uint8_to_float
from adsa_core.loading import DEMO_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, required=True, help="an .npz with images_xz + shape (or images) + labels")
    ap.add_argument("--out", type=Path, required=True, help="the .npz to write: features, labels, classes")
    ap.add_argument("--classifier", type=Path, default=DEMO_DIR / "classifier.pt")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    z = np.load(args.images)
    images = npz_images(z)
    if images is None:
        ap.error(f"{args.images}: expected images or images_xz + shape, found {', '.join(sorted(z))}")
    if "labels" not in z:
        ap.error(f"{args.images}: no labels (FID on the demo weighs each evaluated class alike)")
    extractor = ClassifierFeatures(args.classifier, torch.device("cpu"))
    feats = [extractor.features(uint8_to_float(images[i : i + args.batch]))
             for i in tqdm(range(0, len(images), args.batch), desc="features", unit="batch")]
    extra = {"classes": z["classes"]} if "classes" in z else {}
    np.savez(args.out, features=torch.cat(feats).numpy().astype(np.float32), labels=z["labels"], **extra)
    print(f"{args.out}: {len(images)} feature rows of {extractor.name}")


if __name__ == "__main__":
    main()
