"""Loading official LlamaGen checkpoints unchanged.

Files are dicts with the weights under "model" (DDP), "module" (DeepSpeed) or
"state_dict", or the weights at the top level (FSDP consolidated). Tensors are
memory-mapped where the file allows it and materialised one at a time in the target
dtype and device, so a 3B checkpoint never needs twice its size in RAM.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..config import GPTConfig, VQConfig
from .llamagen import CaptionEmbedder, Transformer
from .rope import precompute_freqs_cis_2d
from .vq import VQModel

WRAPPER_KEYS = ("model", "module", "state_dict")
# Keys official files carry that the inference model does not need.
KNOWN_EXTRAS = ("freqs_cis", "quantize.codebook_used")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested model; the message says why."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return DTYPES[name]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict of a checkpoint file (memory-mapped when possible)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    # Only the zip format (torch.save's default since 1.6) can be memory-mapped; legacy files are read.
    mmap = zipfile.is_zipfile(path)
    try:
        # LlamaGen's training scripts also save their argparse Namespace under "args"; it is plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch weights file "
                              "(or it holds objects other than tensors and plain containers)") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is one clear line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v
          for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise CheckpointError(f"checkpoint {path} contains no tensors")
    return sd


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], device: torch.device | str,
              dtype: torch.dtype, source: str = "checkpoint") -> nn.Module:
    """Copy `sd` into a model built on the meta device; every mismatch is named in the error."""
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    persistent = set(model.state_dict())
    missing = sorted(k for k in persistent if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected and not k.endswith(KNOWN_EXTRAS))
    wrong = sorted(
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
        for k in persistent if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        problems.append("wrong shape: " + ", ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
    if problems:
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(problems))
    tensors = {k: sd[k].to(device=device, dtype=dtype if sd[k].is_floating_point() else None)
               for k in persistent}
    model.load_state_dict(tensors, assign=True)
    return model


def load_gpt(cfg: GPTConfig, path: str | Path | None, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = "float32") -> Transformer:
    """The GPT in eval mode; random init (seeded by the caller) when `path` is None."""
    device, dtype = torch.device(device), parse_dtype(dtype)
    if path is None:
        model = Transformer(cfg)
        init_gpt_weights(model)
        return model.to(device=device, dtype=dtype).eval()
    sd = read_state_dict(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_into(model, sd, device, dtype, f"GPT checkpoint {path}")
    # The RoPE table is not in the file; build it for real (it was created on meta).
    freqs = precompute_freqs_cis_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)
    model.freqs_cis = freqs.to(device)
    return model.eval()


def load_vq(cfg: VQConfig, path: str | Path | None, device: str | torch.device = "cpu",
            dtype: str | torch.dtype = "float32") -> VQModel:
    device, dtype = torch.device(device), parse_dtype(dtype)
    if path is None:
        return VQModel(cfg).to(device=device, dtype=dtype).eval()
    sd = read_state_dict(path)
    with torch.device("meta"):
        model = VQModel(cfg)
    load_into(model, sd, device, dtype, f"VQ checkpoint {path}")
    return model.eval()


def init_gpt_weights(model: Transformer, std: float = 0.02) -> None:
    """Random weights like LlamaGen's init (normal(0, 0.02)), for benchmarks and checkpoint-free tests."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
    if isinstance(model.cls_embedding, CaptionEmbedder):
        nn.init.normal_(model.cls_embedding.uncond_embedding, std=model.config.caption_dim ** -0.5)
