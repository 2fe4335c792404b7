"""Full-size presets build (on the meta device) with exactly the official names and shapes."""

from __future__ import annotations

import json

import pytest
import torch

from adsa_core.config import VQConfig, gpt_preset
from adsa_core.model import Transformer, VQModel
from adsa_core.model.checkpoint import KNOWN_EXTRAS

CASES = {
    "GPT-B c2i 384": lambda: Transformer(gpt_preset("GPT-B", 384)),
    "GPT-L c2i 384": lambda: Transformer(gpt_preset("GPT-L", 384)),
    "GPT-XL c2i 384": lambda: Transformer(gpt_preset("GPT-XL", 384)),
    "GPT-XXL c2i 384": lambda: Transformer(gpt_preset("GPT-XXL", 384)),
    "GPT-3B c2i 384": lambda: Transformer(gpt_preset("GPT-3B", 384)),
    "GPT-XL t2i 256": lambda: Transformer(gpt_preset("GPT-XL", 256, model_type="t2i")),
    "VQ-16": lambda: VQModel(VQConfig()),
}


@pytest.fixture(scope="module")
def official(testdata) -> dict:
    return json.loads((testdata / "official_shapes.json").read_text())


def test_every_official_model_is_covered(official):
    assert set(official) == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_names_and_shapes(official, name):
    with torch.device("meta"):
        model = CASES[name]()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    # Training-only extras (the VQ's usage counter) are accepted by the loader, not kept by the model.
    expected = {k: v for k, v in official[name].items() if not k.endswith(KNOWN_EXTRAS)}
    assert set(official[name]) - set(expected) <= {"quantize.codebook_used"}
    assert sorted(set(shapes) - set(expected)) == [], "keys the official files do not have"
    assert sorted(set(expected) - set(shapes)) == [], "official keys the model lacks"
    wrong = {k: (shapes[k], expected[k]) for k in expected if shapes[k] != list(expected[k])}
    assert wrong == {}


def test_fused_feed_forward_matches_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = Transformer(gpt_preset("GPT-B", 256)).eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, model.config.dim)
    ff = model.layers[0].feed_forward
    before = ff(x)
    ff.fuse()
    torch.testing.assert_close(ff(x), before, rtol=1e-5, atol=1e-5)
    assert ff.w1.weight.data_ptr() == ff.w13.data_ptr()  # a view: no second copy of the weights
    after = model.state_dict()
    assert after.keys() == keys.keys() and all(torch.equal(after[k], v) for k, v in keys.items())
