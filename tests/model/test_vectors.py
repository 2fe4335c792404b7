"""The shared LlamaGen vectors, reproduced through the Python API from the files unchanged."""

from __future__ import annotations

import torch

from adsa_core.reference import generate
from adsa_core.sampling import SamplingParams


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def test_c2i_teacher_forced_logits(c2i_gpt, c2i_io):
    logits = c2i_gpt(c2i_io["idx"], c2i_io["labels"])  # (B, 1 + T - 1, V)
    assert logits.shape == c2i_io["logits"].shape
    assert rel_err(logits, c2i_io["logits"]) < 1e-4


def test_c2i_greedy_cfg4(c2i_gpt, c2i_io):
    codes = generate(c2i_gpt, c2i_io["labels"], SamplingParams(cfg_scale=4.0, greedy=True))
    assert torch.equal(codes, c2i_io["greedy_cfg4"].long())


def test_c2i_greedy_cfg1(c2i_gpt, c2i_io):
    codes = generate(c2i_gpt, c2i_io["labels"], SamplingParams(cfg_scale=1.0, greedy=True))
    assert torch.equal(codes, c2i_io["greedy_cfg1"].long())


def test_t2i_greedy_cfg7_5(t2i_gpt, t2i_io):
    codes = generate(t2i_gpt, t2i_io["caption"], SamplingParams(cfg_scale=7.5, greedy=True),
                     emb_masks=t2i_io["emb_masks"])
    assert torch.equal(codes, t2i_io["greedy_cfg7_5"].long())


@torch.no_grad()
def test_vq_decode(vq_model, vq_io):
    images = vq_model.decode_code(vq_io["codes"])  # codes (B, 16) -> a 4x4 grid each
    assert images.shape == vq_io["images"].shape
    assert rel_err(images, vq_io["images"]) < 1e-4


@torch.no_grad()
def test_vq_encode(vq_model, vq_io):
    codes = vq_model.encode(vq_io["encode_input"])  # (B, h, w)
    assert torch.equal(codes.flatten(), vq_io["encode_codes"])
