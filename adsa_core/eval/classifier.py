"""A small CNN that recognises the demo model's classes (emoji), for the fidelity harness.

`forward` gives class logits (recognition accuracy of generated images); `features` gives
the pooled penultimate activations, the embedding an FID is computed on (as Inception's
pool3 features are for ImageNet). Input: images (B, 3, 128, 128) in [-1, 1], the range
`VQModel.decode_code` produces (clamp first).

Checkpoints are `{"model": state_dict, "config": ClassifierConfig fields}`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int
    width: int = 32  # channels of the first stage; stages have width * (1, 2, 4, 8)
    image_size: int = 128

    @property
    def feature_dim(self) -> int:
        return self.width * 8

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class ResBlock(nn.Module):
    """Two 3x3 convs with a shortcut (strided 1x1 conv where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, stride)
        self.conv2 = _conv_bn(c_out, c_out)
        self.shortcut = (
            nn.Identity() if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.conv2(F.relu(self.conv1(x))))


class EmojiClassifier(nn.Module):
    """ResNet-style: stem /2, four stages (/2 each after the first), global average pool, linear head."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        w = cfg.width
        self.stem = nn.Sequential(_conv_bn(3, w, stride=2), nn.ReLU())  # 128 -> 64
        chans = [w, 2 * w, 4 * w, 8 * w]
        stages, c_in = [], w
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2  # 64 -> 64 -> 32 -> 16 -> 8
            stages.append(nn.Sequential(ResBlock(c_in, c, stride), ResBlock(c, c, 1)))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> penultimate features (B, feature_dim), fp32."""
        h = self.stages(self.stem(images.to(self.head.weight.dtype)))  # (B, 8w, H/16, W/16)
        return h.float().mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> class logits (B, num_classes), fp32."""
        f = self.features(images)
        return self.head(f.to(self.head.weight.dtype)).float()


def save_classifier(model: EmojiClassifier, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Floating-point weights in `dtype` (BatchNorm statistics too), plus the config."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save({"model": sd, "config": model.config.to_dict()}, path)


def load_classifier(path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = torch.float32) -> EmojiClassifier:
    """The classifier in eval mode (BatchNorm uses its running statistics)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        raise ValueError(f"{path} is not a classifier checkpoint ({{'model': ..., 'config': ...}})")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = EmojiClassifier(ClassifierConfig(**obj["config"]))
    model.load_state_dict(obj["model"])
    return model.to(device=device, dtype=dtype).eval()
