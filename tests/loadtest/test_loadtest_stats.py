"""Statistics of the load tester against values computed by hand (see each comment)."""

import math

import pytest

from loadtest.stats import (
    ecdf,
    percentile,
    saturation_point,
    steady_state_rate,
    summarize_stage,
    windowed_rate,
)


def rec(sent, end, status=200, images=1, error=None):
    ok = status == 200 and error is None
    return {
        "stage": "s",
        "sent_s": sent,
        "end_s": end,
        "status": status,
        "ok": ok,
        "error": error,
        "latency_s": None if end is None or sent is None else end - sent,
        "images": images if ok else 0,
    }


def test_percentile_linear_interpolation():
    xs = [4, 1, 3, 2]  # sorted 1 2 3 4; rank = (n-1) q / 100
    assert percentile(xs, 50) == pytest.approx(2.5)  # 1.5 -> 2 + .5
    assert percentile(xs, 90) == pytest.approx(3.7)  # 2.7 -> 3 + .7
    assert percentile(xs, 99) == pytest.approx(3.97)  # 2.97
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 4
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    assert percentile([1.0, None, math.nan, 3.0], 50) == pytest.approx(2.0)  # None/NaN ignored
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    xs = rng.exponential(size=101).tolist()
    for q in (1, 50, 90, 99, 99.9):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_ecdf():
    xs, ys = ecdf([3, 1, 2, 2])
    assert xs == [1, 2, 2, 3]
    assert ys == [0.25, 0.5, 0.75, 1.0]


def test_windowed_rate_half_open():
    ends = [1, 2, 3, 4, 5]
    assert windowed_rate(ends, 2, 4) == pytest.approx(1.0)  # 2, 3 in [2, 4): 2 events / 2 s
    assert windowed_rate(ends, 4, 4) is None


def test_steady_state_rate_falls_back_to_the_whole_span():
    # nothing ends inside [0, 1): use 3 completions over (6 - 0) s
    records = [rec(0, 4), rec(0.5, 5), rec(0.9, 6)]
    assert steady_state_rate(records, 0.0, 1.0, 0.0) == pytest.approx(0.5)
    assert steady_state_rate([], 0.0, 1.0, 0.0) == 0.0


def test_unsaturated_stage():
    # 10 requests sent at t = 0..9, each takes 1 s: ends 1..10. Offered 10 / 10 s = 1/s.
    # p50 = 1 -> warmup 1 s -> window [1, 10) holds ends 1..9: 9 / 9 s = 1.0/s.
    records = [rec(t, t + 1.0) for t in range(10)]
    s = summarize_stage(
        records,
        mode="poisson",
        stage_start_s=0.0,
        arrival_window_s=10.0,
        slo_s=2.0,
        offered_rps=1.0,
        label="rate=1",
    )
    assert s["offered_rps_realized"] == pytest.approx(1.0)
    assert s["warmup_s"] == pytest.approx(1.0)
    assert s["achieved_rps"] == pytest.approx(1.0)
    assert s["achieved_images_per_s"] == pytest.approx(1.0)
    assert s["goodput_rps"] == pytest.approx(1.0)
    assert s["latency_p50_s"] == pytest.approx(1.0) and s["latency_p99_s"] == pytest.approx(1.0)
    assert s["slo_attainment"] == pytest.approx(1.0)
    assert s["throughput_ok"] and s["within_slo"]
    assert s["elapsed_s"] == pytest.approx(10.0)


def test_count_bounded_stage_uses_the_unbiased_rate():
    # Poisson arrivals stopped at the 10th request, sent at t = 10: (10 - 1) / 10 s, not 10 / 10 s
    records = [rec(t, t + 0.5) for t in range(1, 11)]
    s = summarize_stage(
        records,
        mode="poisson",
        stage_start_s=0.0,
        arrival_window_s=10.0,
        slo_s=2.0,
        offered_rps=1.0,
        count_bounded=True,
    )
    assert s["offered_rps_realized"] == pytest.approx(0.9)
    # window [0.5, 10) holds ends 1.5 .. 9.5: 9 / 9.5 s
    assert s["achieved_rps"] == pytest.approx(9 / 9.5)
    assert s["throughput_ok"]


def test_saturated_stage():
    # 10 requests sent at t = 0..9 to a server finishing one every 2 s: ends 2, 4, ..., 20,
    # latencies 2, 3, ..., 11. p50 = 6.5 -> warmup = min(6.5, 10 / 2) = 5 -> window [5, 10) holds
    # ends 6 and 8: 2 / 5 s = 0.4/s. p90: rank 8.1 -> 10.1; p99: rank 8.91 -> 10.91.
    records = [rec(t, 2.0 * (t + 1)) for t in range(10)]
    s = summarize_stage(records, mode="poisson", stage_start_s=0.0, arrival_window_s=10.0, slo_s=5.0, offered_rps=1.0)
    assert s["latency_p50_s"] == pytest.approx(6.5)
    assert s["latency_p90_s"] == pytest.approx(10.1)
    assert s["latency_p99_s"] == pytest.approx(10.91)
    assert s["latency_mean_s"] == pytest.approx(6.5) and s["latency_max_s"] == pytest.approx(11)
    assert s["warmup_s"] == pytest.approx(5.0)
    assert s["achieved_rps"] == pytest.approx(0.4)
    # goodput at SLO 5 s: latencies 2..5 qualify (ends 2, 4, 6, 8); 6 and 8 are in the window
    assert s["goodput_rps"] == pytest.approx(0.4)
    assert s["slo_attainment"] == pytest.approx(0.4)
    assert not s["throughput_ok"] and not s["within_slo"]


def test_stage_counts_429s_and_errors_apart():
    records = [
        rec(0, 1),
        rec(1, 2, images=2),
        rec(2, 2.1, status=429),
        rec(3, 3.1, status=429),
        rec(4, 5, status=500),
        rec(5, None, status=None, error="timeout"),
        rec(None, None, status=None, error="client_overload"),
    ]
    s = summarize_stage(records, mode="poisson", stage_start_s=0.0, arrival_window_s=6.0, slo_s=10.0, offered_rps=1.0)
    assert s["requests_scheduled"] == 7 and s["requests_sent"] == 6
    assert s["ok"] == 2 and s["rejected_429"] == 2 and s["errors"] == 3
    assert s["errors_by_kind"] == {"500": 1, "client_overload": 1, "timeout": 1}
    assert s["images"] == 3
    assert s["offered_rps_realized"] == pytest.approx(1.0)  # 6 sent / 6 s


def test_closed_loop_stage_uses_the_whole_span():
    # 4 ok requests back to back from t = 0: ends 1, 2, 3, 4 -> 4 / 4 s; 2 images each
    records = [rec(t, t + 1.0, images=2) for t in range(4)]
    s = summarize_stage(records, mode="concurrency", stage_start_s=0.0, arrival_window_s=3.0, slo_s=0.5, concurrency=1)
    assert s["achieved_rps"] == pytest.approx(1.0)
    assert s["achieved_images_per_s"] == pytest.approx(2.0)
    assert s["goodput_rps"] == 0.0  # every request took 1 s > 0.5 s
    assert s["offered_rps_realized"] is None


def _stage(rate, achieved, p99, slo=1.0, realized=None, mode="poisson"):
    return {
        "mode": mode,
        "offered_rps": rate,
        "offered_rps_realized": realized or rate,
        "achieved_rps": achieved,
        "latency_p99_s": p99,
        "slo_s": slo,
    }


def test_saturation_point():
    stages = [_stage(1, 1.0, 0.3), _stage(2, 1.95, 0.5), _stage(4, 3.0, 0.9), _stage(8, 3.1, 4.0)]
    assert saturation_point(stages) == 2  # 4: 3.0 < 0.9 * 4
    stages[1] = _stage(2, 1.95, 1.5)  # p99 over the SLO
    assert saturation_point(stages) == 1
    assert saturation_point([_stage(1, 0.5, 0.1)]) is None
    # exactly 90 % counts; closed-loop stages and stages without successes are ignored
    assert saturation_point([_stage(10, 9.0, 0.1), _stage(20, 20, None), _stage(40, 40, 0.1, mode="x")]) == 10
    # compared against the realised rate, reported as the nominal one
    assert saturation_point([_stage(4, 3.7, 0.1, realized=4.1)]) == 4
    assert saturation_point([_stage(4, 3.7, 0.1, realized=4.2)]) is None
