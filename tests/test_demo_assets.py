"""The shipped emoji demo model (adsa_core/assets/demo): files, loading, one generation, the classifier.

CPU only, a few seconds: the GPT has ~10M parameters and one 128 px image is 256 tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adsa_core.config import GPTConfig, VQConfig
from adsa_core.eval.classifier import EmojiClassifier, load_classifier
from adsa_core.model.checkpoint import load_gpt, load_vq
from adsa_core.reference import generate
from adsa_core.sampling import SamplingParams

DEMO = Path(__file__).resolve().parents[1] / "adsa_core" / "assets" / "demo"


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((DEMO / "config.json").read_text())


@pytest.fixture(scope="module")
def classes(config: dict) -> list[dict]:
    return json.loads((DEMO / config["classes"]).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def vq(config: dict):
    return load_vq(VQConfig.from_dict(config["vq"]), DEMO / config["vq_ckpt"])


def test_config_and_files(config: dict) -> None:
    for key in ("name", "image_size", "gpt", "vq", "gpt_ckpt", "vq_ckpt", "classifier_ckpt", "classes", "sampling"):
        assert key in config, key
    for key in ("gpt_ckpt", "vq_ckpt", "classifier_ckpt", "classes"):
        assert (DEMO / config[key]).is_file(), config[key]
    gpt, vq = GPTConfig.from_dict(config["gpt"]), VQConfig.from_dict(config["vq"])
    assert gpt.model_type == "c2i" and gpt.vocab_size == vq.codebook_size and gpt.has_null_class
    assert config["image_size"] == gpt.grid_size * vq.downsample == 128
    SamplingParams(**config["sampling"])  # valid defaults
    total = sum((DEMO / config[k]).stat().st_size for k in ("gpt_ckpt", "vq_ckpt", "classifier_ckpt"))
    assert total < 36e6, f"shipped weights are {total / 1e6:.1f} MB"
    assert (DEMO / "MODEL_CARD.md").is_file()


def test_classes(config: dict, classes: list[dict]) -> None:
    assert len(classes) == config["gpt"]["num_classes"]
    assert [c["id"] for c in classes] == list(range(len(classes)))
    for c in classes:
        assert c["name"] and c["name"] == c["name"].lower() and c["emoji"]
    assert len({c["emoji"] for c in classes}) == len(classes)
    assert classes[0] == {"id": 0, "name": "grinning face", "emoji": "😀"}


def test_generate_one_image(config: dict, vq) -> None:
    gpt = load_gpt(GPTConfig.from_dict(config["gpt"]), DEMO / config["gpt_ckpt"])
    torch.manual_seed(0)
    codes = generate(gpt, torch.tensor([0]), SamplingParams(**config["sampling"]), seeds=torch.tensor([0]))
    assert codes.shape == (1, gpt.config.block_size)
    assert int(codes.min()) >= 0 and int(codes.max()) < gpt.config.vocab_size
    with torch.no_grad():
        img = vq.decode_code(codes)
    assert img.shape == (1, 3, 128, 128) and torch.isfinite(img).all()


def _probe_renders() -> tuple[list[str], torch.Tensor]:
    """Training renders shipped for this test (made by tools/emoji_data.py --probe), (N, 3, 128, 128) in [-1, 1]."""
    img = Image.open(DEMO / "probe_renders.png")
    emojis = json.loads(img.text["emoji"])
    x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, 128, 128N)
    return emojis, torch.stack(x.split(128, dim=2))


def test_classifier_recognises_vq_reconstructions(config: dict, classes: list[dict], vq) -> None:
    clf = load_classifier(DEMO / config["classifier_ckpt"])
    assert isinstance(clf, EmojiClassifier) and clf.config.num_classes == len(classes)
    by_emoji = {c["emoji"]: c["id"] for c in classes}
    emojis, x = _probe_renders()
    y = torch.tensor([by_emoji[e] for e in emojis])
    with torch.no_grad():
        recon = vq.decode_code(vq.encode(x)).clamp(-1, 1)
        logits = clf(recon)
        feats = clf.features(recon)
    assert feats.shape == (len(emojis), clf.config.feature_dim)
    correct = (logits.argmax(1) == y).sum().item()
    assert correct >= len(emojis) - 1, f"{correct}/{len(emojis)} recognised"


@pytest.mark.slow
def test_train_demo_smoke(tmp_path: Path) -> None:
    """tools/train_demo.py --tiny end to end on CPU (synthetic 4-image data set): the outputs load."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    mods = {}
    for name in ("emoji_data", "train_demo"):
        spec = importlib.util.spec_from_file_location(name, root / "tools" / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(name, mods[name])  # dataclasses look their module up there
        spec.loader.exec_module(mods[name])
    rng = np.random.default_rng(0)
    images = np.full((4, 128, 128, 3), 255, np.uint8)
    for i in range(4):  # a coloured square per image; classes 0, 0, 1, 1
        images[i, 32:96, 32:96] = rng.integers(0, 255, 3, dtype=np.uint8)
    data = {"images": images, "labels": np.array([0, 0, 1, 1], np.int16),
            "classes": [{"id": 0, "name": "a", "emoji": "a"}, {"id": 1, "name": "b", "emoji": "b"}],
            "stats": {}}
    mods["emoji_data"].save(data, tmp_path / "d.npz", preset=0)
    out = tmp_path / "out"
    report = mods["train_demo"].main(["--tiny", "--device", "cpu", "--data", str(tmp_path / "d.npz"),
                                      "--out", str(out), "--eval-n", "1"])
    assert report["gpt"]["steps"] == 2 and report["vq"]["steps"] == 2
    cfg = json.loads((out / "config.json").read_text())
    gpt = load_gpt(GPTConfig.from_dict(cfg["gpt"]), out / cfg["gpt_ckpt"])
    vq = load_vq(VQConfig.from_dict(cfg["vq"]), out / cfg["vq_ckpt"])
    assert load_classifier(out / cfg["classifier_ckpt"]).config.num_classes == 2
    codes = generate(gpt, torch.tensor([1]), SamplingParams(**cfg["sampling"]))
    assert vq.decode_code(codes).shape == (1, 3, cfg["image_size"], cfg["image_size"])
