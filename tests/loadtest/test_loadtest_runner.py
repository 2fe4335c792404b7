"""Small pieces of the runner: server-reported timings, stage labels, record fields."""

import pytest

from loadtest.runner import RequestRecord, Stage, _absorb_image, parse_server_timing


def test_parse_server_timing():
    assert parse_server_timing("queue;dur=12.5, run;dur=800") == pytest.approx(0.0125)
    assert parse_server_timing("run;dur=1, queue;desc=x;dur=2") == pytest.approx(0.002)
    assert parse_server_timing("run;dur=1") is None
    assert parse_server_timing("queue;dur=abc") is None
    assert parse_server_timing(None) is None


def test_absorb_image_folds_per_image_stats():
    rec = RequestRecord(stage="s", index=0)
    for q, run, ev in ((0.5, 2.0, 10), (0.25, 3.0, 5)):
        _absorb_image(
            rec,
            {
                "timings": {"queue_s": q, "run_s": run},
                "kv_stats": {"evictions": ev, "spilled_bytes": ev * 100, "peak_kv_tokens": ev},
            },
        )
    assert rec.server_queue_s == 0.5 and rec.server_run_s == 3.0  # max over images
    assert rec.kv_evictions == 15 and rec.kv_spilled_bytes == 1500  # sums
    assert rec.peak_kv_tokens == 10
    _absorb_image(rec, "not a dict")
    _absorb_image(rec, {"timings": None})
    assert rec.kv_evictions == 15


def test_record_derived_times():
    rec = RequestRecord(
        stage="s", index=3, scheduled_s=1.0, sent_s=1.25, first_byte_s=2.0, first_preview_s=1.5, end_s=3.25
    )
    d = rec.to_json()
    assert d["latency_s"] == 2.0 and d["ttfb_s"] == 0.75 and d["ttfp_s"] == 0.25 and d["schedule_lag_s"] == 0.25
    assert RequestRecord(stage="s", index=0).to_json()["latency_s"] is None


def test_stage_labels():
    assert Stage("poisson", 0.5).label == "rate=0.5"
    assert Stage("poisson", 4.0).label == "rate=4"
    assert Stage("concurrency", 8.0).label == "concurrency=8"
