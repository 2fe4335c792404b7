"""adsa-bench --smoke on CPU: every row kind runs and the JSON carries the issue's fields."""

from __future__ import annotations

import json
from pathlib import Path

from adsa_core.eval import bench


def test_smoke_writes_every_field(tmp_path: Path) -> None:
    assert bench.main(["--smoke", "--device", "cpu", "--waves", "2", "--kv-cache-dtypes", "auto,fp8",
                       "--out", str(tmp_path)]) == 0
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
