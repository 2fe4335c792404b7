"""Finding saturation: the closed-loop capacity probe, open-loop stages at fractions of it, the
steady closed-loop rate, and the saturation summary (capacity, p99 at 50 % / 90 %). Against the
FAKE server (conftest.py) and hand-computed records."""

from __future__ import annotations

import json

import pytest

from loadtest.cli import main
from loadtest.runner import Stage
from loadtest.stats import saturation_summary, summarize_stage


def rec(sent, end, images=1):
    return {"sent_s": sent, "end_s": end, "status": 200, "ok": True, "latency_s": end - sent, "images": images}


def test_closed_loop_steady_rate_leaves_out_ramp_and_drain():
    # 2 clients: one request per second each, ends at 1, 2, ..., 10 (client 0) and 1.5 .. 10.5
    # (client 1); last send at 9.5 -> window 9.5 s. Ramp 0.5 + p50 1.0 = warm-up 1.5 s:
    # ends in [1.5, 9.5): 1.5 .. 9 -> 2, 3, .., 9 (8) + 1.5, 2.5, .., 8.5 (8) = 16 in 8 s = 2/s
    records = [rec(t - 1, t) for t in range(1, 11)] + [rec(t - 1, t) for t in (x + 0.5 for x in range(1, 11))]
    s = summarize_stage(
        records, mode="concurrency", stage_start_s=0.0, arrival_window_s=9.5, slo_s=5.0, concurrency=2, ramp_s=0.5
    )
    assert s["warmup_s"] == pytest.approx(1.5)
    assert s["steady_rps"] == pytest.approx(2.0)
    assert s["steady_images_per_s"] == pytest.approx(2.0)
    assert s["achieved_rps"] == pytest.approx(20 / 10.5)  # the whole span, drain included


def _stage(label, rate, achieved, p50, p99, fraction=None, mode="poisson", ok=10):
    return {
        "label": label,
        "mode": mode,
        "fraction": fraction,
        "offered_rps": rate,
        "offered_rps_realized": rate,
        "offered_images_per_s": rate,
        "achieved_rps": achieved,
        "achieved_images_per_s": 2 * achieved,  # 2 images per request
        "steady_images_per_s": 2 * achieved,
        "latency_p50_s": p50,
        "latency_p90_s": p99,
        "latency_p99_s": p99,
        "slo_s": 5.0,
        "ok": ok,
        "rejected_429": 0,
        "errors": 0,
    }


def test_saturation_summary_with_a_probe():
    probe = {"steady_rps": 10.0, "steady_images_per_s": 20.0}
    stages = [
        _stage("probe", None, 9.0, 2.0, 3.0, mode="concurrency"),
        _stage("rate=0.5xcap", 5.0, 5.0, 0.5, 0.9, fraction=0.5),
        _stage("rate=0.9xcap", 9.0, 8.8, 0.8, 1.9, fraction=0.9),
        _stage("rate=1.3xcap", 13.0, 10.2, 3.0, 6.0, fraction=1.3),
    ]
    s = saturation_summary(stages, probe)
    assert s["reference"] == "probe" and s["saturation_images_per_s"] == 20.0 and s["saturation_rps"] == 10.0
    assert s["capacity_images_per_s"] == pytest.approx(20.4)  # 1.3x stage sustained 10.2 req/s x 2
    assert s["saturation_point_rps"] == 9.0 and s["saturation_point_images_per_s"] == pytest.approx(18.0)
    assert s["images_per_request"] == pytest.approx(2.0)
    assert s["at"]["0.5"]["label"] == "rate=0.5xcap" and s["at"]["0.5"]["latency_p99_s"] == 0.9
    assert s["at"]["0.9"]["label"] == "rate=0.9xcap" and s["at"]["0.9"]["latency_p99_s"] == 1.9


def test_saturation_summary_without_a_probe_picks_the_nearest_stage():
    stages = [
        _stage("rate=2", 2.0, 2.0, 0.3, 0.5),
        _stage("rate=4", 4.0, 3.9, 0.5, 1.0),
        _stage("rate=8", 8.0, 4.2, 4, 9),
    ]
    s = saturation_summary(stages)
    assert s["reference"] == "saturation_point" and s["saturation_rps"] == 4.0
    assert s["at"]["0.5"]["label"] == "rate=2"  # 0.5 x 4 = 2
    assert s["at"]["0.9"]["label"] == "rate=4"  # 3.6: nearest is 4, within 25 %
    assert saturation_summary([])["at"] == {"0.5": None, "0.9": None}


def test_stage_labels_of_probe_and_relative_stages():
    assert Stage("concurrency", 16, probe=True).label == "probe concurrency=16"
    assert Stage("poisson", 3.7, fraction=0.5).label == "rate=0.5xcap"


def test_probe_then_relative_rates_against_the_fake(tmp_path, make_fake_server):
    # 4 slots x 50 ms per image: the fake serves ~80 req/s; 8 clients keep it full
    with make_fake_server(slots=4, service_s=0.05, max_queue=100) as srv:
        code = main(
            [
                "--url",
                srv.url,
                "--probe-concurrency",
                "8",
                "--probe-duration",
                "1.5",
                "--ramp",
                "0.2",
                "--relative-rates",
                "0.5,1.3",
                "--duration",
                "1",
                "--requests",
                "500",
                "--max-duration",
                "20",
                "--timeout",
                "5",
                "--policies",
                "adsa",
                "--budgets",
                "0.25",
                "--metrics-interval",
                "0.2",
                "--quiet",
                "--out",
                str(tmp_path),
            ]
        )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    labels = [s["label"] for s in summary["stages"]]
    assert labels == ["probe concurrency=8", "rate=0.5xcap", "rate=1.3xcap"]
    probe = summary["probe"]
    assert probe["concurrency"] == 8 and 40 <= probe["steady_rps"] <= 90, probe
    by = {s["label"]: s for s in summary["stages"]}
    assert by["rate=0.5xcap"]["offered_rps"] == pytest.approx(0.5 * probe["steady_rps"])
    assert by["rate=1.3xcap"]["fraction"] == 1.3 and by["probe concurrency=8"]["probe"]
    sat = summary["saturation"]
    assert sat["reference"] == "probe" and sat["saturation_images_per_s"] == probe["steady_images_per_s"]
    assert sat["at"]["0.5"]["label"] == "rate=0.5xcap" and sat["at"]["0.9"] is None
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert {(r["payload"]["policy"], r["payload"]["kv_budget"]) for r in records} == {("adsa", 0.25)}
    md = (tmp_path / "summary.md").read_text()
    assert "## Saturation" in md and "| 50% | rate=0.5xcap |" in md


@pytest.mark.parametrize(
    "argv",
    [["--relative-rates", "0.5"], ["--probe-concurrency", "4", "--relative-rates", "0.5,-1"], ["--budgets", "x"]],
)
def test_bad_saturation_arguments_exit_2(argv, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--classes", "0", "--out", str(tmp_path)])
    assert e.value.code == 2
