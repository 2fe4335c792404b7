"""Shared fixtures: the LlamaGen compatibility vectors in tests/data/llamagen (see its README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adsa_core.config import GPTConfig, VQConfig
from adsa_core.model import Transformer, VQModel, load_gpt, load_vq

TESTDATA = Path(__file__).resolve().parent / "data" / "llamagen"

# Tiny models on a small shared CPU: extra threads only contend with each other.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert (TESTDATA / "MANIFEST.json").is_file(), f"test vectors not found at {TESTDATA}"
    return TESTDATA


@pytest.fixture(scope="session")
def manifest(testdata: Path) -> dict:
    return json.loads((testdata / "MANIFEST.json").read_text())


@pytest.fixture(scope="session")
def c2i_io(testdata: Path) -> dict:
    return torch.load(testdata / "c2i_io.pt", weights_only=True)


@pytest.fixture(scope="session")
def t2i_io(testdata: Path) -> dict:
    return torch.load(testdata / "t2i_io.pt", weights_only=True)


@pytest.fixture(scope="session")
def vq_io(testdata: Path) -> dict:
    return torch.load(testdata / "vq_io.pt", weights_only=True)


@pytest.fixture(scope="session")
def c2i_gpt(testdata: Path, manifest: dict) -> Transformer:
    return load_gpt(GPTConfig.from_dict(manifest["c2i_gpt.pt"]["config"]), testdata / "c2i_gpt.pt")


@pytest.fixture(scope="session")
def t2i_gpt(testdata: Path, manifest: dict) -> Transformer:
    return load_gpt(GPTConfig.from_dict(manifest["t2i_gpt.pt"]["config"]), testdata / "t2i_gpt.pt")


@pytest.fixture(scope="session")
def vq_model(testdata: Path, manifest: dict) -> VQModel:
    return load_vq(VQConfig.from_dict(manifest["vq.pt"]["config"]), testdata / "vq.pt")


TINY_T5_WORDS = ["a", "red", "fox", "in", "the", "snow", "cat", "dog", "blue", "sky", "over", "mountain",
                 "painting", "of", "with", "and", "at", "night"]


def build_tiny_t5(path: Path, d_model: int = 24) -> Path:
    """A random 2-layer T5 encoder plus a word-level unigram tokenizer, saved like a hub directory.

    Built offline: the tokenizer is assembled from a fixed vocabulary with `tokenizers`, so no
    download (and no sentencepiece training) is needed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    # sentencepiece-style pieces: "\u2581" marks a word start; single letters spell unknown words
    pieces = ["<pad>", "</s>", "<unk>", *(f"\u2581{w}" for w in TINY_T5_WORDS), *"abcdefghijklmnopqrstuvwxyz",
              "\u2581"]
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0)
    tokenizer.save_pretrained(path)
    cfg = T5Config(vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    T5EncoderModel(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, manifest) -> Path:
    """Width = the shared t2i GPT's caption_dim, so its features can drive that model."""
    pytest.importorskip("transformers")
    d_model = manifest["t2i_gpt.pt"]["config"]["caption_dim"]
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), d_model)


@pytest.fixture
def under_triton_interpreter() -> Callable[[str], str]:
    """Runs a test file as a script in a child process with TRITON_INTERPRET=1 (Triton picks the interpreter when
    a kernel module is imported, so not in this process) and returns its stdout; skips without Triton."""
    pytest.importorskip("triton")

    def run(path: str) -> str:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        r = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        return r.stdout

    return run
