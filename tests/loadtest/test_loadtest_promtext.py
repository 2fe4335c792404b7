"""Parsing /metrics text, counter deltas and histogram quantiles (PromQL histogram_quantile semantics)."""

import math

import pytest

from loadtest import promtext

BEFORE = """\
# HELP adsa_requests_total Requests.
# TYPE adsa_requests_total counter
adsa_requests_total{status="ok"} 10
adsa_requests_total{status="rejected"} 1
adsa_requests_created{status="ok"} 1.7e9
# TYPE adsa_num_requests_waiting gauge
adsa_num_requests_waiting 3
# TYPE adsa_queue_time_seconds histogram
adsa_queue_time_seconds_bucket{le="0.1"} 1
adsa_queue_time_seconds_bucket{le="0.5"} 2
adsa_queue_time_seconds_bucket{le="1.0"} 2
adsa_queue_time_seconds_bucket{le="+Inf"} 2
adsa_queue_time_seconds_sum 0.6
adsa_queue_time_seconds_count 2
adsa_http_requests_total{route="/v1/generate",status="200",note="a \\"quoted\\", comma\\\\ and\\nnewline"} \
5 1700000000000
"""

AFTER = """\
# TYPE adsa_requests_total counter
adsa_requests_total{status="ok"} 25
adsa_requests_total{status="rejected"} 1
adsa_requests_total{status="error"} 2
# TYPE adsa_num_requests_waiting gauge
adsa_num_requests_waiting 0
# TYPE adsa_queue_time_seconds histogram
adsa_queue_time_seconds_bucket{le="0.1"} 3
adsa_queue_time_seconds_bucket{le="0.5"} 7
adsa_queue_time_seconds_bucket{le="1.0"} 9
adsa_queue_time_seconds_bucket{le="+Inf"} 12
adsa_queue_time_seconds_sum 9.6
adsa_queue_time_seconds_count 12
adsa_http_requests_total{route="/v1/generate",status="200",note="x"} 2
"""


def test_parse_samples_labels_and_types():
    exp = promtext.parse(BEFORE)
    assert exp.get("adsa_requests_total", status="ok") == 10
    assert exp.sum("adsa_requests_total") == 11
    assert exp.get("adsa_num_requests_waiting") == 3
    assert exp.get("adsa_queue_time_seconds_bucket", le="+Inf") == 2
    assert exp.types["adsa_queue_time_seconds"] == "histogram"
    note = [dict(labels)["note"] for name, labels in exp.samples if name == "adsa_http_requests_total"][0]
    assert note == 'a "quoted", comma\\ and\nnewline'
    assert {"adsa_requests_total", "adsa_queue_time_seconds", "adsa_num_requests_waiting"} <= exp.families()
    assert "adsa_queue_time_seconds_bucket" not in exp.families()
    assert exp.type_of("adsa_queue_time_seconds_bucket") == "histogram"


def test_parse_special_values_and_errors():
    exp = promtext.parse("a +Inf\nb -Inf\nc NaN\n")
    assert exp.get("a") == math.inf and exp.get("b") == -math.inf and math.isnan(exp.get("c"))
    with pytest.raises(promtext.ParseError):
        promtext.parse("adsa_x{bad} 1\n")
    with pytest.raises(promtext.ParseError):
        promtext.parse("adsa_x one\n")


def test_counter_deltas():
    d = promtext.counter_deltas(promtext.parse(BEFORE), promtext.parse(AFTER))
    assert promtext.delta_sum(d, "adsa_requests_total", status="ok") == 15
    assert promtext.delta_sum(d, "adsa_requests_total", status="rejected") == 0
    assert promtext.delta_sum(d, "adsa_requests_total", status="error") == 2  # new series counts from 0
    assert promtext.delta_sum(d, "adsa_queue_time_seconds_count") == 10
    assert promtext.delta_sum(d, "adsa_queue_time_seconds_sum") == pytest.approx(9.0)
    assert promtext.delta_sum(d, "adsa_num_requests_waiting") is None  # gauges are not deltas
    assert promtext.delta_sum(d, "adsa_requests_created") is None
    # 5 -> 2 under other labels is a new series; the one with note="x" is new and counts whole
    assert promtext.delta_sum(d, "adsa_http_requests_total", note="x") == 2


def test_counter_reset_counts_the_value_after():
    d = promtext.counter_deltas(promtext.parse("x_total 100\n"), promtext.parse("x_total 7\n"))
    assert d[("x_total", ())] == 7


def test_histogram_quantile_by_hand():
    # cumulative: <=0.1: 2, <=0.5: 6, <=1: 8, +Inf: 10
    b = [(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (math.inf, 10.0)]
    assert promtext.histogram_quantile(0.1, b) == pytest.approx(0.05)  # rank 1 in [0, 0.1]: 0 + 0.1 * 1/2
    assert promtext.histogram_quantile(0.5, b) == pytest.approx(0.4)  # rank 5 in (0.1, 0.5]: 0.1 + 0.4 * 3/4
    assert promtext.histogram_quantile(0.75, b) == pytest.approx(0.875)  # rank 7.5: 0.5 + 0.5 * 1.5/2
    assert promtext.histogram_quantile(0.9, b) == pytest.approx(1.0)  # rank 9 in +Inf: highest finite bound
    assert promtext.histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert promtext.histogram_quantile(0.5, []) is None


def test_histogram_from_deltas():
    d = promtext.counter_deltas(promtext.parse(BEFORE), promtext.parse(AFTER))
    buckets = promtext.histogram_buckets(d, "adsa_queue_time_seconds")
    assert buckets == [(0.1, 2.0), (0.5, 5.0), (1.0, 7.0), (math.inf, 10.0)]
    # rank 5 falls at the top of (0.1, 0.5]
    assert promtext.histogram_quantile(0.5, buckets) == pytest.approx(0.5)
