"""End to end: `python -m loadtest` against a FAKE HTTP server on 127.0.0.1 (tests the load tester only).

The fake (conftest.py) sleeps instead of generating; a test against the real adsa-serve
belongs beside the server's own tests.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from loadtest.cli import main
from loadtest.runner import RunConfig, Stage, run_sync
from loadtest.workload import Workload

REPO = Path(__file__).resolve().parents[2]
RUN_FILES = (
    "requests.jsonl",
    "summary.json",
    "summary.md",
    "metrics_before.txt",
    "metrics_after.txt",
    "metrics_delta.json",
    "metrics_timeseries.jsonl",
    "throughput_vs_offered.png",
    "latency_cdf.png",
    "kv_usage.png",
)


def _png_ok(path: Path) -> None:
    assert path.stat().st_size > 1000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200


def _cli(args, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help(capsys):
    for argv in (["--help"], ["compare", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--rates",
        "--concurrency",
        "--requests",
        "--duration",
        "--max-duration",
        "--slo-ms",
        "--stream",
        "--out",
        "compare",
        "RUN_A",
        "--labels",
    ):
        assert flag in out


def test_run_and_compare(tmp_path, fake_server, capsys):
    a, b, cmp_dir = tmp_path / "a", tmp_path / "b", tmp_path / "cmp"
    common = [
        "--url",
        fake_server.url,
        "--requests",
        "12",
        "--duration",
        "0.8",
        "--max-duration",
        "30",
        "--timeout",
        "5",
        "--slo-ms",
        "1000",
        "--metrics-interval",
        "0.1",
    ]
    # the CLI for real, in its own process (progress line on stderr)
    r = _cli([*common, "--rates", "10,1000", "--concurrency", "2", "--out", str(a)])
    assert r.returncode == 0, r.stderr
    assert "[rate=10]" in r.stderr and "[concurrency=2]" in r.stderr  # the progress line
    for name in (*RUN_FILES, "throughput_vs_concurrency.png"):
        assert (a / name).exists(), name
    for png in a.glob("*.png"):
        _png_ok(png)

    summary = json.loads((a / "summary.json").read_text())
    records = [json.loads(line) for line in (a / "requests.jsonl").read_text().splitlines()]
    assert len(records) == summary["totals"]["requests"] == sum(s["requests_scheduled"] for s in summary["stages"])
    assert [s["label"] for s in summary["stages"]] == ["rate=10", "rate=1000", "concurrency=2"]
    assert summary["model"]["id"] == "fake-demo"
    by = {s["label"]: s for s in summary["stages"]}
    assert all(s["requests_scheduled"] <= 12 for s in summary["stages"])
    assert by["concurrency=2"]["requests_scheduled"] == 12
    # the fake serves 2 x 20 img/s: 1000/s (12 arrivals in ~12 ms) overflows its queue of 4 -> 429s
    assert by["rate=1000"]["rejected_429"] > 0
    assert not by["rate=1000"]["throughput_ok"]
    assert summary["saturation_point_rps"] != 1000
    assert by["rate=10"]["ok"] == by["rate=10"]["requests_sent"] > 0 and by["rate=10"]["errors"] == 0
    r429 = [r for r in records if r["status"] == 429]
    assert r429 and all(r["retry_after"] == "1" and r["error"] == "queue_full" for r in r429)
    ok = [r for r in records if r["ok"]]
    assert all(r["latency_s"] >= 0.05 and r["images"] == 1 and r["server_queue_s"] is not None for r in ok)
    assert all(r["server_run_s"] == 0.05 and r["kv_evictions"] == 3 and r["kv_spilled_bytes"] == 12288 for r in ok)
    assert by["rate=10"]["server_queue_p99_s"] is not None
    assert {r["payload"]["class_label"] for r in ok} <= {0, 1, 2, 3}  # discovered from /v1/models
    # server-side deltas agree with what the client saw
    assert by["rate=10"]["server"]["adsa_images_generated_total"] == by["rate=10"]["ok"]
    assert summary["server_totals"]["adsa_images_generated_total"] == summary["totals"]["images"]
    ts = [json.loads(line) for line in (a / "metrics_timeseries.jsonl").read_text().splitlines()]
    assert len(ts) >= 5 and any(row["adsa_kv_cache_usage_ratio"] for row in ts)
    md = (a / "summary.md").read_text()
    assert "saturation point" in md and "rate=1000" in md and "![kv_usage.png](kv_usage.png)" in md

    # run B: streamed, with a policy/budget mix from a workload file
    wl = tmp_path / "wl.json"
    wl.write_text(
        json.dumps(
            {
                "mix": [
                    {"weight": 2, "class_label": 1, "policy": "adsa", "kv_budget": 64},
                    {"weight": 1, "class_label": 2, "policy": "dense"},
                ]
            }
        )
    )
    assert main([*common, "--rates", "10", "--stream", "--workload", str(wl), "--out", str(b), "--quiet"]) == 0
    assert "[rate=" not in capsys.readouterr().err  # --quiet
    recs_b = [json.loads(line) for line in (b / "requests.jsonl").read_text().splitlines()]
    ok_b = [r for r in recs_b if r["ok"]]
    assert ok_b and all(r["ttfp_s"] is not None and 0 < r["ttfp_s"] < r["latency_s"] for r in ok_b)
    assert all(r["events"].get("done") == 1 and r["payload"]["stream"] for r in ok_b)
    assert all(r["kv_evictions"] == 3 and r["server_queue_s"] is not None for r in ok_b)
    assert {(r["payload"]["policy"], r["payload"].get("kv_budget")) for r in recs_b} <= {
        ("adsa", 64),
        ("dense", None),
    }
    stage_b = json.loads((b / "summary.json").read_text())["stages"][0]
    assert stage_b["ttfp_p50_s"] is not None
    md_b = (b / "summary.md").read_text()  # the report a person reads has it too; a run without previews does not
    previews = md_b.split("## Time to first preview (streamed)")[1]
    assert f"| {stage_b['label']} | " in previews
    assert "first preview" not in md

    assert main(["compare", str(a), str(b), "--out", str(cmp_dir), "--labels", "json,sse"]) == 0
    for name in (
        "compare.md",
        "compare.json",
        "throughput_vs_offered.png",
        "latency_cdf.png",
        "kv_usage.png",
    ):
        assert (cmp_dir / name).exists(), name
    for png in cmp_dir.glob("*.png"):
        _png_ok(png)
    cmp = json.loads((cmp_dir / "compare.json").read_text())
    assert [row["stage"] for row in cmp["stages"]] == ["rate=10", "rate=1000", "concurrency=2"]
    assert cmp["stages"][1]["achieved_rps"]["b"] is None  # only in A
    assert "| rate=10 |" in (cmp_dir / "compare.md").read_text()


def test_hard_stop_bounds_the_run(tmp_path, make_fake_server):
    # each image takes 3 s and stages would last 60 s / 1000 requests: --max-duration 1 must win
    with make_fake_server(slots=1, service_s=3.0, max_queue=1000) as srv:
        cfg = RunConfig(
            url=srv.url,
            out=tmp_path,
            stages=[Stage("poisson", 10.0), Stage("concurrency", 4)],
            requests_per_stage=1000,
            stage_duration_s=60.0,
            max_duration_s=1.0,
            timeout_s=60.0,
            workload=Workload(classes=[0]),
            progress=False,
            metrics_interval_s=0.2,
        )
        t = time.monotonic()
        result = run_sync(cfg)
        took = time.monotonic() - t
    assert took < 1.0 + 3.0, took  # + the final /metrics scrape (at most 2 s) and slack
    assert result.hard_stopped
    assert 3 <= len(result.records) <= 25  # ~10/s for 1 s
    assert [s["label"] for s in result.stages] == ["rate=10"]  # the closed-loop stage never started
    assert not any(r["ok"] for r in result.records)
    assert all(r["error"] in ("hard_stop", "timeout") for r in result.records), {r["error"] for r in result.records}


def test_client_overload_and_unreachable_metrics(tmp_path, make_fake_server):
    # --max-inflight 1 against a slow fake: arrivals beyond one in flight are client_overload
    with make_fake_server(slots=4, service_s=0.3, max_queue=100) as srv:
        code = main(
            [
                "--url",
                srv.url,
                "--rates",
                "50",
                "--requests",
                "10",
                "--duration",
                "1",
                "--max-inflight",
                "1",
                "--max-duration",
                "10",
                "--metrics-url",
                srv.url + "/nope",
                "--classes",
                "0",
                "--quiet",
                "--out",
                str(tmp_path),
            ]
        )
    assert code == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["stages"][0]["errors_by_kind"].get("client_overload", 0) >= 5
    assert any("/metrics answered 404" in n for n in s["notes"])
    assert not (tmp_path / "metrics_before.txt").exists()
    for png in ("throughput_vs_offered.png", "latency_cdf.png", "kv_usage.png"):
        _png_ok(tmp_path / png)  # drawn even with no metric samples


def test_no_server_exits_3(tmp_path, capsys):
    # a closed port on loopback: every request fails; the run still writes its report
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(
        [
            "--url",
            f"http://127.0.0.1:{port}",
            "--rates",
            "20",
            "--requests",
            "3",
            "--duration",
            "1",
            "--max-duration",
            "10",
            "--classes",
            "0",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 3
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["totals"]["ok"] == 0 and s["totals"]["errors"] == 3
    assert set(s["stages"][0]["errors_by_kind"]) == {"ConnectError"}
    # why they failed, not only how many: in summary.json, summary.md and on the console
    [top] = s["top_errors"]
    assert (top["error"], top["count"], top["status"]) == ("ConnectError", 3, None) and top["message"]
    line = f"3 x ConnectError: {top['message']}"
    assert f"- {line}" in (tmp_path / "summary.md").read_text()
    assert f"errors: {line}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--rates", "0"],
        ["--rates", "x"],
        ["--concurrency", "2.5"],
        ["--requests", "0"],
        ["compare", "a"],
        ["--workload", "/nonexistent.json"],
        ["--url", "localhost:8000"],  # no scheme: every request would fail
        ["--url", "http://"],
        ["--metrics-url", "ftp://host/metrics"],
        ["--duration", "nan"],  # a stage that would never end, or never start
        ["--duration", "inf"],
        ["--timeout", "1e400"],
        ["--pause", "-1"],
        ["--ramp", "soon"],
        ["--requests", "many"],
        ["--rates", "nan"],  # was: sent, and reported a capacity of nan images/s
        ["--rates", "inf"],
        ["--cfg-scale", "nan"],  # was: a worker's traceback (JSON has no nan), and exit 3
        ["--temperature", "inf"],
    ],
)
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path)] if argv[0] != "compare" else argv)
    assert e.value.code == 2
    if argv in (["--rates", "x"], ["--concurrency", "2.5"]):  # not a number: the message names the flag
        assert f"error: {argv[0]}" in capsys.readouterr().err
    if argv[0].endswith("url"):
        assert f"argument {argv[0]}: expected http://host:port" in capsys.readouterr().err
    if argv[0] in ("--duration", "--timeout", "--pause", "--ramp", "--requests"):  # one line naming flag and value
        assert f"argument {argv[0]}: expected a " in (err := capsys.readouterr().err) and repr(argv[1]) in err
