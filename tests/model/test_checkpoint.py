"""Official checkpoint formats: wrappers, dtypes, extras, and errors that name the offending key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from adsa_core.config import GPTConfig, VQConfig
from adsa_core.model import CheckpointError, load_gpt, load_vq, read_state_dict


@pytest.fixture(scope="module")
def c2i_cfg(manifest) -> GPTConfig:
    return GPTConfig.from_dict(manifest["c2i_gpt.pt"]["config"])


@pytest.fixture(scope="module")
def c2i_sd(testdata) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in torch.load(testdata / "c2i_gpt.pt", weights_only=True)["model"].items()}


def save(tmp_path: Path, obj, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("wrapper", ["model", "module", "state_dict", None])
def test_wrappers_load_identically(tmp_path, c2i_cfg, c2i_sd, c2i_gpt, wrapper):
    obj = c2i_sd if wrapper is None else {wrapper: c2i_sd, "steps": 7, "args": {"lr": 1e-4}}
    model = load_gpt(c2i_cfg, save(tmp_path, obj))
    assert_same_weights(model, c2i_gpt)


def test_training_checkpoint_with_args_and_optimizer(tmp_path, c2i_cfg, c2i_sd, c2i_gpt):
    # LlamaGen's train_c2i.py: {"model", "optimizer", "steps", "args": argparse.Namespace}
    obj = {"model": c2i_sd, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []},
           "steps": 1000, "args": argparse.Namespace(gpt_model="GPT-B", lr=1e-4)}
    assert_same_weights(load_gpt(c2i_cfg, save(tmp_path, obj)), c2i_gpt)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path, c2i_cfg, c2i_sd, c2i_gpt):
    obj = {"module": {f"module._orig_mod.{k}": v for k, v in c2i_sd.items()}}
    assert_same_weights(load_gpt(c2i_cfg, save(tmp_path, obj)), c2i_gpt)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_files_load(tmp_path, c2i_cfg, c2i_sd, stored):
    half = {k: v.to(stored) if v.is_floating_point() else v for k, v in c2i_sd.items()}
    model = load_gpt(c2i_cfg, save(tmp_path, {"model": half}), dtype="float32")
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, half[k].float()), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_into_half_precision(testdata, c2i_cfg, c2i_sd, dtype):
    model = load_gpt(c2i_cfg, testdata / "c2i_gpt.pt", dtype=dtype)
    assert model.dtype == dtype
    for k, v in model.state_dict().items():
        assert torch.equal(v, c2i_sd[k].to(dtype)), k
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, dtype=torch.long), labels)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_missing_key_is_named(tmp_path, c2i_cfg, c2i_sd):
    sd = dict(c2i_sd)
    del sd["layers.1.feed_forward.w2.weight"]
    with pytest.raises(CheckpointError, match=r"missing: layers\.1\.feed_forward\.w2\.weight"):
        load_gpt(c2i_cfg, save(tmp_path, {"model": sd}))


def test_unexpected_key_is_named(tmp_path, c2i_cfg, c2i_sd):
    sd = {**c2i_sd, "layers.0.attention.bogus": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected: layers\.0\.attention\.bogus"):
        load_gpt(c2i_cfg, save(tmp_path, {"model": sd}))


def test_wrong_shape_is_named(tmp_path, c2i_cfg, c2i_sd):
    sd = {**c2i_sd, "tok_embeddings.weight": torch.zeros(95, 64)}
    with pytest.raises(CheckpointError, match=r"wrong shape: tok_embeddings\.weight \(checkpoint \(95, 64\)"):
        load_gpt(c2i_cfg, save(tmp_path, {"model": sd}))


def test_config_mismatch_with_a_real_file(testdata, c2i_cfg):
    cfg = GPTConfig(**{**c2i_cfg.to_dict(), "n_layer": 3})
    with pytest.raises(CheckpointError, match=r"missing: layers\.2\."):
        load_gpt(cfg, testdata / "c2i_gpt.pt")


def test_known_extras_are_accepted(tmp_path, c2i_cfg, c2i_sd, c2i_gpt, testdata, vq_model):
    sd = {**c2i_sd, "freqs_cis": torch.zeros(17, 8, 2)}
    assert_same_weights(load_gpt(c2i_cfg, save(tmp_path, {"model": sd})), c2i_gpt)
    # The shared VQ file carries quantize.codebook_used; it loads (vq_model fixture) and the model drops it.
    assert "quantize.codebook_used" in read_state_dict(testdata / "vq.pt")
    assert "quantize.codebook_used" not in vq_model.state_dict()


def test_unreadable_files_are_checkpoint_errors(tmp_path, testdata, c2i_cfg):
    with pytest.raises(CheckpointError, match="not found"):
        load_gpt(c2i_cfg, tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((testdata / "c2i_gpt.pt").read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(truncated)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(save(tmp_path, [torch.zeros(2)], "list.pt"))


def test_legacy_format_loads(tmp_path, c2i_cfg, c2i_sd, c2i_gpt):
    path = tmp_path / "legacy.pt"
    torch.save({"model": c2i_sd}, path, _use_new_zipfile_serialization=False)
    assert_same_weights(load_gpt(c2i_cfg, path), c2i_gpt)


def _mapped_file(ptr: int) -> str | None:
    """The file backing the memory mapping that holds address `ptr` (Linux /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5].strip() if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_zip_checkpoints_are_memory_mapped(testdata, manifest):
    path = (testdata / "vq.pt").resolve()
    sd = read_state_dict(path)
    w = sd["decoder.conv_out.weight"]
    assert _mapped_file(w.data_ptr()) == str(path)
    # Loading at the file's dtype on the CPU keeps the mapping: weights are not copied into RAM.
    vq = load_vq(VQConfig.from_dict(manifest["vq.pt"]["config"]), path)
    assert _mapped_file(vq.decoder.conv_out.weight.data_ptr()) == str(path)
