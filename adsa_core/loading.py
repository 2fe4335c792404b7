"""From user-facing model options (CLI flags, server settings) to loaded models.

One place decides presets vs JSON configs vs the embedded demo model, device and dtype,
so the CLI, the server, the benchmark and the fidelity harness all agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .classes import default_classes
from .config import ConfigError, GPTConfig, VQConfig, gpt_preset
from .model.checkpoint import load_gpt, load_vq, parse_dtype
from .model.fp8 import quantize_matmuls
from .model.llamagen import Transformer
from .model.vq import VQModel

DEMO_DIR = Path(__file__).parent / "assets" / "demo"


@dataclass(frozen=True)
class ModelSpec:
    """What to load. Everything None: the embedded emoji demo model."""

    gpt_model: str | None = None  # preset name, e.g. "GPT-XL"
    gpt_config: str | None = None  # LlamaGen-style JSON file (or inline JSON text)
    gpt_ckpt: str | None = None
    vq_ckpt: str | None = None
    vq_config: str | None = None  # JSON file or inline JSON text
    image_size: int | None = None
    num_classes: int | None = None  # overrides the preset's 1000
    text_encoder: str | None = None  # local T5 directory (t2i)
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    seed: int = 0  # for random weights when no checkpoint is given
    matmul_dtype: str = "auto"  # "fp8": the transformer blocks' matmuls in e4m3, row-wise scales (model/fp8.py)

    @property
    def is_demo(self) -> bool:
        return not any([self.gpt_model, self.gpt_config, self.gpt_ckpt, self.vq_ckpt, self.vq_config])


@dataclass
class LoadedModels:
    name: str
    gpt: Transformer
    vq: VQModel | None
    gpt_config: GPTConfig
    vq_config: VQConfig | None
    image_size: int
    device: torch.device
    dtype: torch.dtype
    classes: list[dict] | None = None  # [{"id", "name", ...}] when known (classes.py: emoji, synonyms)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    text_encoder: Any = None  # CaptionEncoder for t2i models with a local T5


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def read_json_arg(value: str, what: str) -> dict:
    """A JSON object given inline or as a file path."""
    text = value
    if not value.lstrip().startswith("{"):
        p = Path(value)
        if not p.is_file():
            raise ConfigError(f"{what} file not found: {value}")
        text = p.read_text()
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object")
    return d


def limit_cpu_threads() -> None:
    """Leave one core to the engine's other threads (scheduler, image stage, HTTP): with every core
    in torch's pool, they oversubscribe it and a 2-core machine decodes 20x slower. The setting
    belongs to the calling OS thread, so each thread that computes calls this. An explicit
    OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1)))


MATMUL_DTYPES = ("auto", "fp8")


def load_models(spec: ModelSpec) -> LoadedModels:
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    check_matmul_dtype(spec.matmul_dtype, device, dtype)
    if device.type == "cpu":
        limit_cpu_threads()
    models = _load_demo(spec, device, dtype) if spec.is_demo else _load_checkpoints(spec, device, dtype)
    if spec.matmul_dtype == "fp8":
        quantize_matmuls(models.gpt)
    return models


def check_matmul_dtype(matmul_dtype: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raises ConfigError where fp8 matmuls cannot run: row-wise scaled fp8 GEMMs need an sm_89+ GPU (Ada,
    Hopper) and a bf16 model there; a CPU runs them in any dtype."""
    if matmul_dtype not in MATMUL_DTYPES:
        raise ConfigError(f"matmul dtype {matmul_dtype!r}: choose one of {', '.join(MATMUL_DTYPES)}")
    if matmul_dtype == "fp8" and device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise ConfigError("fp8 matmuls need an sm_89 or newer GPU (Ada, Hopper)")
        if dtype != torch.bfloat16:
            raise ConfigError("fp8 matmuls on a GPU need the model in bfloat16")


def _load_checkpoints(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> LoadedModels:
    vq_cfg = VQConfig()
    if spec.vq_config:
        vq_cfg = VQConfig.from_dict(read_json_arg(spec.vq_config, "--vq-config"))
    if spec.gpt_config:
        gpt_json = read_json_arg(spec.gpt_config, "--gpt-config")
        if spec.num_classes:
            gpt_json = {**gpt_json, "num_classes": spec.num_classes}
        gpt_cfg = GPTConfig.from_dict(gpt_json)
        image_size = spec.image_size or gpt_cfg.grid_size * vq_cfg.downsample
        if image_size != gpt_cfg.grid_size * vq_cfg.downsample:
            raise ConfigError(
                f"--image-size {image_size} does not match block_size {gpt_cfg.block_size} "
                f"with VQ downsampling {vq_cfg.downsample}"
            )
    else:
        image_size = spec.image_size or 384
        overrides: dict[str, Any] = {"num_classes": spec.num_classes} if spec.num_classes else {}
        gpt_cfg = gpt_preset(spec.gpt_model or "GPT-XL", image_size, vq_cfg.downsample, **overrides)
    if spec.gpt_ckpt is None:
        torch.manual_seed(spec.seed)
    gpt = load_gpt(gpt_cfg, spec.gpt_ckpt, device, dtype)
    vq = load_vq(vq_cfg, spec.vq_ckpt, device, dtype) if spec.vq_ckpt else None
    if vq is not None and vq_cfg.codebook_size < gpt_cfg.vocab_size:
        raise ConfigError(
            f"VQ codebook ({vq_cfg.codebook_size}) is smaller than the GPT vocabulary ({gpt_cfg.vocab_size})"
        )
    text_encoder = None
    if spec.text_encoder:
        from .model.text import CaptionEncoder

        # Same precision as the GPT, like LlamaGen's sample_t2i.py (T5 in bf16 on GPU).
        text_encoder = CaptionEncoder(spec.text_encoder, device=device, max_length=gpt_cfg.cls_token_num,
                                      dtype=dtype)
    name = Path(spec.gpt_ckpt).stem if spec.gpt_ckpt else (spec.gpt_model or "GPT-custom") + "-random"
    classes = default_classes(gpt_cfg.model_type, gpt_cfg.num_classes)
    return LoadedModels(
        name, gpt, vq, gpt_cfg, vq_cfg, image_size, device, dtype, classes=classes, text_encoder=text_encoder
    )


def _load_demo(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> LoadedModels:
    cfg_path = DEMO_DIR / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"the embedded demo model is missing ({cfg_path}); pass --gpt-ckpt/--vq-ckpt")
    meta = json.loads(cfg_path.read_text())
    gpt_cfg = GPTConfig.from_dict(meta["gpt"])
    vq_cfg = VQConfig.from_dict(meta["vq"])
    gpt = load_gpt(gpt_cfg, DEMO_DIR / meta["gpt_ckpt"], device, dtype)
    vq = load_vq(vq_cfg, DEMO_DIR / meta["vq_ckpt"], device, dtype)
    classes = json.loads((DEMO_DIR / meta["classes"]).read_text()) if meta.get("classes") else None
    return LoadedModels(
        meta.get("name", "emoji-demo"), gpt, vq, gpt_cfg, vq_cfg, int(meta["image_size"]), device, dtype,
        classes=classes, sampling_defaults=dict(meta.get("sampling", {})),
    )
