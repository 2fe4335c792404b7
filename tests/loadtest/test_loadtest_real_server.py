"""The load tester against the REAL daemon (uvicorn + the engine-core process, tiny model, CPU, loopback):
a short, bounded dense-vs-adsa run that produces every report file, and the dashboard's metric
list checked against a live /metrics scrape instead of a constant."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from server_live import LiveServer  # noqa: E402

from loadtest.cli import main  # noqa: E402

GPU_ONLY = {"adsa_gpu_memory_used_bytes", "adsa_gpu_memory_total_bytes"}  # NVML gauges need a GPU


@pytest.fixture(scope="module")
def real_server():
    srv = LiveServer("loadtest", {"ADSA_MAX_BATCH_SIZE": "8", "ADSA_KV_BUDGET": "0.5"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_dense_vs_adsa_report_against_the_real_server(real_server, tmp_path):
    runs = {}
    for policy in ("dense", "adsa"):
        out = tmp_path / policy
        rc = main(
            [
                "--url",
                real_server.url,
                "--rates",
                "4",
                "--concurrency",
                "2",
                "--requests",
                "6",
                "--duration",
                "3",
                "--max-duration",
                "90",
                "--timeout",
                "60",
                "--policies",
                policy,
                "--classes",
                "0,1,2,3",
                "--metrics-interval",
                "0.2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        assert rc == 0
        runs[policy] = json.loads((out / "summary.json").read_text())
        records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
        ok = [r for r in records if r["ok"]]
        assert ok and len(ok) == len(records), [r.get("error") for r in records if not r["ok"]]
        assert all(r["payload"]["policy"] == policy for r in records)
        for png in out.glob("*.png"):
            Image.open(png).verify()
        # what the server counted equals what the client received
        assert runs[policy]["server_totals"]["adsa_images_generated_total"] == runs[policy]["totals"]["images"]
        evictions = [r["kv_evictions"] for r in ok]
        assert all(e == 0 for e in evictions) if policy == "dense" else all(e > 0 for e in evictions)
    assert main(["compare", str(tmp_path / "dense"), str(tmp_path / "adsa"), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.md").read_text().count("|") > 10


def deploy_metric_list() -> dict[str, str]:
    """SERVER_METRICS of tests/deploy/conftest.py: the list the dashboard, alerts and autoscalers are
    checked against (loaded by path: every test folder has a module named conftest)."""
    path = Path(__file__).resolve().parents[1] / "deploy" / "conftest.py"
    spec = importlib.util.spec_from_file_location("deploy_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SERVER_METRICS


def test_dashboard_metrics_exist_in_the_live_server(real_server):
    SERVER_METRICS = deploy_metric_list()

    real_server.client().post("/v1/generate", json={"class_label": 1}).raise_for_status()
    names = {name for name, _ in real_server.metrics()}
    families = {
        n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum").removesuffix("_created") for n in names
    }
    missing = set(SERVER_METRICS) - GPU_ONLY - families - names
    assert not missing, f"dashboard/alert metrics the server does not export: {sorted(missing)}"
