"""adsa-bench --smoke on CPU: every row kind runs and the JSON carries the issue's fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adsa_core.config import GPTConfig, VQConfig
from adsa_core.eval import bench
from adsa_core.model.fp8 import Fp8Linear


def test_smoke_writes_every_field(tmp_path: Path) -> None:
    # --compile --vq-autotune: nothing compiles on a CPU, so no row may say it was autotuned
    assert bench.main(["--smoke", "--device", "cpu", "--waves", "2", "--kv-cache-dtypes", "auto,fp8",
                       "--compile", "--vq-autotune", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["rows"]
    assert [(r["policy"], r["budget"], r["kv_cache_dtype"]) for r in rows] == [
        ("reference", None, "auto"), ("dense", None, "auto"), ("dense", None, "fp8"), ("line", 0.5, "auto"),
        ("adsa", 0.5, "auto"), ("window", 0.5, "auto"), ("line", 0.5, "fp8"), ("adsa", 0.5, "fp8"),
        ("window", 0.5, "fp8")]
    for r in rows:
        for field in ("policy", "budget", "batch", "img_per_s", "tok_per_s", "peak_memory_bytes", "kv_bytes",
                      "step_ms", "ratio_to_baseline"):
            assert field in r, field
        assert r["img_per_s"] > 0 and r["tok_per_s"] == r["img_per_s"] * 16  # 16 tokens per smoke image
        assert abs(r["ratio_to_baseline"] - r["img_per_s"] / rows[0]["img_per_s"]) < 1e-9
    dense, adsa = rows[1], rows[3]
    assert dense["note"] == "2 waves" and rows[2]["note"] == "2 waves, fp8 KV"
    assert rows[2]["kv_bytes"] < dense["kv_bytes"]  # fp8: one byte per K/V element
    assert 0 < adsa["kv_bytes"] <= dense["kv_bytes"]  # per wave (smoke: both fit one 16-slot page)
    assert "| adsa (2 waves) | 0.5 |" in (tmp_path / "bench.md").read_text()


def test_fp8_matmul_rows_run_a_quantized_copy_and_the_reference_keeps_the_model(tmp_path: Path) -> None:
    assert bench.main(["--smoke", "--device", "cpu", "--waves", "1", "--policies", "adsa", "--matmul-dtypes",
                       "auto,fp8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["policy"], r["matmul_dtype"]) for r in rows] == [
        ("reference", "auto"), ("dense", "auto"), ("adsa", "auto"), ("dense", "fp8"), ("adsa", "fp8")]
    assert all(("fp8 matmuls" in r["note"]) == (r["matmul_dtype"] == "fp8") for r in rows)
    models = bench.random_models(GPTConfig(dim=64, n_layer=1, n_head=4, vocab_size=64, block_size=16, num_classes=10),
                                 VQConfig(codebook_size=64, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                                          z_channels=32, ch=32), "t", 32, torch.device("cpu"), torch.float32)
    fp8 = bench.fp8_matmuls(models)
    assert isinstance(fp8.gpt.layers[0].attention.wqkv, Fp8Linear)
    assert isinstance(models.gpt.layers[0].attention.wqkv, torch.nn.Linear)  # the reference's model is untouched


@pytest.mark.parametrize(("args", "message"), [
    (["--smoke", "--device", "cpu", "--policies", "foo"], "--policies: unknown 'foo'"),
    (["--device", "cpu", "--presets", "GPT-Z"], "unknown GPT preset 'GPT-Z'"),
    (["--device", "cpu", "--batches", "abc"], "--batches: expected a positive integer, got 'abc'"),
    (["--device", "cpu", "--sparse-batches", "0"], "--sparse-batches: expected a positive integer, got '0'"),
    (["--device", "cpu", "--dtype", "bogus"], "unknown dtype"),
    (["--device", "cpu", "--waves", "0"], "argument --waves: expected a positive integer, got '0'"),
    (["--device", "cpu", "--spill-limit-mb", "nan"],
     "argument --spill-limit-mb: expected a finite number >= 0, got 'nan'"),
    (["--device", "cpu", "--cfg-scale", "nan"], "cfg_scale must be a finite number, got nan"),
    (["--device", "cpu", "--image-sizes", "100"], "image size 100 is not a multiple"),
    (["--device", "cpu", "--kv-cache-dtypes", "fp16"], "--kv-cache-dtypes: unknown 'fp16'"),
    (["--device", "cpu", "--matmul-dtypes", "int4"], "matmul dtype 'int4': choose one of auto, fp8"),
    (["--smoke", "--device", "cpu", "--vq-autotune"], "--vq-autotune tunes the compiled VQ decoder: add --compile"),
    (["--smoke", "--device", "cpu", "--presets", "GPT-B", "--batches", "8"],
     "--smoke runs its own tiny model at batch 2 and budget 1/2: drop --presets, --batches"),
])
def test_a_mistake_in_the_arguments_is_one_line_before_any_model_is_built(args, message, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench.main([*args, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: adsa-bench") and f"adsa-bench: error: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_preset_without_a_gpu_is_refused_unless_the_cpu_is_asked_for(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.parse_args(["--presets", "GPT-B"])
    assert "no GPU: the presets need one" in capsys.readouterr().err
    assert bench.parse_args(["--presets", "GPT-B", "--device", "cpu"]).device == torch.device("cpu")
