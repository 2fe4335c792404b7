"""Caption encoder for text-conditional models: T5 features, left-padded as LlamaGen expects.

LlamaGen (`autoregressive/sample/sample_t2i.py`) tokenizes each prompt to 120 tokens
(padding + truncation), runs the T5 encoder, then moves the valid tokens to the END of
the sequence ("left padding"), flips the mask to match and zeroes the padded features.
The GPT was trained on that layout, so we reproduce it exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError


def clean_prompt(text: str) -> str:
    """The part of LlamaGen's `clean_caption` that matters for plain prompts: lower case, single spaces.

    (The full cleaner also strips URLs, HTML and marketing words; it needs bs4 and ftfy.)
    """
    return " ".join(str(text).lower().split())


def left_pad(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded encoder output -> LlamaGen's left-padded layout.

    emb: (B, T, C) with the valid tokens first; mask: (B, T) 1 on valid tokens (a prefix).
    Returns (emb, mask) with the valid tokens last and the padded features zeroed.
    """
    new_mask = torch.flip(mask, dims=[-1])  # valid tokens form a prefix, so the flip is a suffix
    rows = []
    for e, m in zip(emb, mask, strict=True):
        valid = int(m.sum().item())
        rows.append(torch.cat([e[valid:], e[:valid]]))  # (T, C): padding first, then the prompt
    new_emb = torch.stack(rows) * new_mask[:, :, None].to(emb.dtype)
    return new_emb, new_mask


class CaptionEncoder:
    """A T5 encoder (e.g. FLAN-T5-XL) loaded from a local directory; no network access."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        max_length: int = 120,
        dtype: torch.dtype = torch.float32,
        clean: bool = True,
    ):
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"text encoder directory not found: {model_dir}")
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise ConfigError("--text-encoder needs transformers and sentencepiece "
                              "(pip install 'adsa-serve[text]')") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            msg = " ".join(str(e).split())
            raise ConfigError(f"cannot load the T5 text encoder from {model_dir}: {msg}") from None
        self.model.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]  # transformers' wrapped .to
        self.device = torch.device(device)
        self.max_length = max_length
        self.clean = clean

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (caption (B, max_length, d_model), emb_masks (B, max_length)), left-padded."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [clean_prompt(p) if self.clean else p for p in prompts]
        tokens = self.tokenizer(
            texts, max_length=self.max_length, padding="max_length", truncation=True,
            return_attention_mask=True, add_special_tokens=True, return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)  # (B, T)
        mask = tokens["attention_mask"].to(self.device)  # (B, T), 1 on the prompt's tokens
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d_model)
        return left_pad(emb, mask)
