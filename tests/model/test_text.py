"""CaptionEncoder: LlamaGen's T5 preprocessing (120 tokens, left padding, masked features)."""

from __future__ import annotations

import pytest
import torch

from adsa_core.config import ConfigError
from adsa_core.model.text import CaptionEncoder, left_pad

PROMPTS = ["a red fox in the snow", "Blue  SKY over a mountain at night, painting of a cat with a dog"]


@pytest.fixture(scope="module")
def encoder(tiny_t5_dir) -> CaptionEncoder:
    return CaptionEncoder(tiny_t5_dir, device="cpu", max_length=120)


def test_shapes_and_left_padding(encoder):
    caption, masks = encoder.encode(PROMPTS)
    assert caption.shape == (2, 120, encoder.dim) and caption.dtype == torch.float32
    assert masks.shape == (2, 120)
    for m in masks:
        n = int(m.sum())
        assert 1 < n < 120
        assert m[: 120 - n].eq(0).all() and m[120 - n:].eq(1).all()  # padding first, prompt last
    assert masks[0].sum() < masks[1].sum()


def test_features_are_the_encoder_output_moved_to_the_end(encoder):
    caption, masks = encoder.encode(PROMPTS)
    texts = [" ".join(p.lower().split()) for p in PROMPTS]
    tok = encoder.tokenizer(texts, max_length=120, padding="max_length", truncation=True, return_tensors="pt")
    tok = {k: tok[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = encoder.model(**tok).last_hidden_state  # (B, 120, d_model), right-padded
    for b in range(len(PROMPTS)):
        n = int(tok["attention_mask"][b].sum())
        assert int(masks[b].sum()) == n
        assert torch.equal(caption[b, 120 - n:], out[b, :n])  # the valid tokens, in order, at the end
        assert caption[b, : 120 - n].eq(0).all()  # padded features are zeroed
        # padding does not leak into the valid tokens: same as encoding the prompt alone
        with torch.no_grad():
            alone = encoder.model(input_ids=tok["input_ids"][b: b + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(caption[b, 120 - n:], alone, rtol=1e-5, atol=1e-5)


def test_prompts_are_cleaned_like_llamagen(encoder):
    a, ma = encoder.encode(["A  Red FOX in the Snow "])
    b, mb = encoder.encode(["a red fox in the snow"])
    assert torch.equal(a, b) and torch.equal(ma, mb)


def test_long_prompts_are_truncated(encoder):
    caption, masks = encoder.encode(["a red fox " * 100])
    assert caption.shape[1] == 120 and masks.sum() == 120


def test_left_pad_matches_llamagen_loop():
    torch.manual_seed(0)
    emb = torch.randn(3, 10, 4)
    mask = torch.tensor([[1] * k + [0] * (10 - k) for k in (3, 10, 1)])
    new_emb, new_mask = left_pad(emb, mask)
    # sample_t2i.py: flip the mask, rotate each row by its valid count, zero the padding
    ref_mask = torch.flip(mask, dims=[-1])
    ref = torch.stack([torch.cat([e[int(m.sum()):], e[: int(m.sum())]])
                       for e, m in zip(emb, mask, strict=True)])
    assert torch.equal(new_mask, ref_mask)
    assert torch.equal(new_emb, ref * ref_mask[:, :, None])


def test_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        CaptionEncoder(tmp_path / "nope")
    with pytest.raises(ConfigError, match="cannot load the T5 text encoder"):
        CaptionEncoder(tmp_path)
