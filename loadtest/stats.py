"""Statistics over per-request records: percentiles, throughput, goodput, saturation.

A record is the dict written to requests.jsonl (see runner.RequestRecord.to_json). Times are
seconds relative to the run start; the fields used here:

    stage, ok, status, error, sent_s, end_s, latency_s, ttfb_s, ttfp_s, images

Definitions (also in docs/OPERATIONS.md):

* percentiles: linear interpolation between closest ranks (numpy's default), over successful
  requests only;
* achieved throughput of an open-loop stage: successful completions whose end falls in the
  steady-state window [stage_start + warmup, stage_start + arrival_window_s), divided by the
  window's length, with warmup = min(median latency, arrival_window_s / 2). Counting only
  completions inside the arrival window removes the fill-up at the start and the drain at the
  end, so an unsaturated server measures ~= the offered rate whatever its latency, and a
  saturated one measures its capacity. Falls back to ok / (last end - stage start) when the
  window holds nothing;
* goodput: the same estimator restricted to requests that succeeded within the SLO;
* realised offered rate: requests sent / arrival window; (sent - 1) / window when the stage
  stopped at its request count (the window then ends at the last arrival, see summarize_stage);
* saturation point: the highest offered rate (of the open-loop stages) whose achieved throughput
  is >= 90 % of the realised offered rate and whose p99 latency is within the SLO;
* steady throughput (both modes): the achieved-throughput estimator above applied to the stage's
  own span; for a closed-loop stage, completions in [warm-up, last send) over that window, with
  warm-up = min(ramp + median latency, half the window): it leaves out the ramp-up of the first
  batch and the drain after the last send. This is how a closed-loop probe measures capacity
  (`--probe-concurrency`, see saturation_summary);
* capacity: the most images/s any stage sustained (a closed-loop stage's steady throughput or an
  open-loop stage's achieved throughput).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

SATURATION_FRACTION = 0.9


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """q-th percentile (0..100), linear interpolation between closest ranks; None for no values (None
    entries, such as a time that was not measured, are skipped)."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ecdf(values: Iterable[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their cumulative fractions (i/n), for CDF plots."""
    xs = sorted(v for v in values if v is not None)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def windowed_rate(end_times: Sequence[float], start: float, stop: float) -> float | None:
    """Events per second among `end_times` that fall in [start, stop); None for an empty window."""
    length = stop - start
    if length <= 0:
        return None
    count = sum(1 for t in end_times if start <= t < stop)
    return count / length


def steady_state_rate(
    records: Sequence[dict[str, Any]],
    stage_start_s: float,
    arrival_window_s: float,
    warmup_s: float,
) -> float:
    """Completions per second of `records` (already filtered: ok, or ok within SLO), see module doc."""
    ends = [r["end_s"] for r in records if r.get("end_s") is not None]
    if not ends:
        return 0.0
    rate = windowed_rate(ends, stage_start_s + warmup_s, stage_start_s + arrival_window_s)
    if rate:  # None (empty window) or 0 completions in it: use the whole span instead
        return rate
    span = max(ends) - stage_start_s
    return len(ends) / span if span > 0 else 0.0


def _images(r: dict[str, Any]) -> int:
    return int(r.get("images") or 0)


def is_error(record: dict[str, Any]) -> bool:
    """A request that failed: not ok, and not a 429 (the server's backpressure, counted apart)."""
    return not record.get("ok") and record.get("status") != 429


def summarize_stage(
    records: Sequence[dict[str, Any]],
    *,
    mode: str,
    stage_start_s: float,
    arrival_window_s: float,
    slo_s: float,
    offered_rps: float | None = None,
    concurrency: int | None = None,
    label: str = "",
    count_bounded: bool = False,
    ramp_s: float = 0.0,
) -> dict[str, Any]:
    """Everything summary.json says about one stage (server-side metric deltas are added by the runner).

    `count_bounded`: the arrivals stopped at the request count, so the window ends at the last
    arrival; the realised rate is then (n - 1) / window, the unbiased estimate for Poisson
    arrivals (n / window overstates it by n / (n - 1)). Otherwise n / window.
    """
    sent = [r for r in records if r.get("sent_s") is not None]
    ok = [r for r in records if r.get("ok")]
    rejected = [r for r in records if r.get("status") == 429]
    failed = [r for r in records if is_error(r)]
    errors = Counter(str(r.get("status") or r.get("error") or "unknown") for r in failed)
    lat = [r["latency_s"] for r in ok if r.get("latency_s") is not None]
    ends = [r["end_s"] for r in records if r.get("end_s") is not None]
    elapsed = (max(ends) - stage_start_s) if ends else arrival_window_s

    p50 = percentile(lat, 50)
    if mode == "poisson":
        warmup = min(p50 if p50 is not None else 0.0, arrival_window_s / 2)
        achieved = steady_state_rate(ok, stage_start_s, arrival_window_s, warmup)
        good = [r for r in ok if r["latency_s"] <= slo_s]
        goodput = steady_state_rate(good, stage_start_s, arrival_window_s, warmup)
        n_arrivals = len(sent) - 1 if count_bounded and len(sent) > 1 else len(sent)
        realized = n_arrivals / arrival_window_s if arrival_window_s > 0 else None
        steady = achieved
    else:  # closed loop: whole stage span
        achieved = len(ok) / elapsed if elapsed > 0 else 0.0
        good = [r for r in ok if r["latency_s"] <= slo_s]
        goodput = len(good) / elapsed if elapsed > 0 else 0.0
        realized = None
        warmup = min(ramp_s + (p50 or 0.0), arrival_window_s / 2)
        steady = steady_state_rate(ok, stage_start_s, arrival_window_s, warmup)
    images_per_request = (sum(_images(r) for r in ok) / len(ok)) if ok else 0.0
    p99 = percentile(lat, 99)
    return {
        "label": label,
        "mode": mode,
        "offered_rps": offered_rps,
        "offered_rps_realized": realized,
        "concurrency": concurrency,
        "arrival_window_s": arrival_window_s,
        "count_bounded": count_bounded,
        "elapsed_s": elapsed,
        "warmup_s": warmup,
        "requests_scheduled": len(records),
        "requests_sent": len(sent),
        "ok": len(ok),
        "rejected_429": len(rejected),
        "errors": len(failed),
        "errors_by_kind": dict(sorted(errors.items())),
        "images": sum(_images(r) for r in ok),
        "achieved_rps": achieved,
        "achieved_images_per_s": achieved * images_per_request,
        "steady_rps": steady,
        "steady_images_per_s": steady * images_per_request,
        "goodput_rps": goodput,
        "goodput_images_per_s": goodput * images_per_request,
        "slo_s": slo_s,
        "slo_attainment": (len(good) / len(sent)) if sent else None,
        "latency_p50_s": p50,
        "latency_p90_s": percentile(lat, 90),
        "latency_p99_s": p99,
        "latency_mean_s": (sum(lat) / len(lat)) if lat else None,
        "latency_max_s": max(lat) if lat else None,
        "ttfb_p50_s": percentile((r.get("ttfb_s") for r in ok), 50),
        "ttfb_p99_s": percentile((r.get("ttfb_s") for r in ok), 99),
        "ttfp_p50_s": percentile((r.get("ttfp_s") for r in ok), 50),
        "ttfp_p99_s": percentile((r.get("ttfp_s") for r in ok), 99),
        "server_queue_p50_s": percentile((r.get("server_queue_s") for r in ok), 50),
        "server_queue_p99_s": percentile((r.get("server_queue_s") for r in ok), 99),
        "schedule_lag_p99_s": percentile((r.get("schedule_lag_s") for r in sent), 99),
        "within_slo": p99 is not None and p99 <= slo_s,
        "throughput_ok": (realized is not None and realized > 0 and achieved >= SATURATION_FRACTION * realized),
    }


def saturation_point(stages: Sequence[dict[str, Any]], fraction: float = SATURATION_FRACTION) -> float | None:
    """Highest offered rate whose achieved throughput >= fraction * offered and p99 <= SLO.

    Uses the realised offered rate (requests actually sent / arrival window) for the comparison,
    and returns the nominal rate of the winning stage. None when no open-loop stage qualifies.
    """
    best = None
    for s in stages:
        if s.get("mode") != "poisson":
            continue
        offered = s.get("offered_rps_realized") or s.get("offered_rps")
        p99 = s.get("latency_p99_s")
        if not offered or p99 is None:
            continue
        if s["achieved_rps"] >= fraction * offered and p99 <= s["slo_s"]:
            nominal = s.get("offered_rps") or offered
            best = nominal if best is None else max(best, nominal)
    return best


def _stage_brief(s: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "label",
        "fraction",
        "offered_rps",
        "offered_images_per_s",
        "achieved_rps",
        "achieved_images_per_s",
        "latency_p50_s",
        "latency_p90_s",
        "latency_p99_s",
        "ok",
        "rejected_429",
        "errors",
        "within_slo",
    )
    return {k: s.get(k) for k in keys}


def saturation_summary(
    stages: Sequence[dict[str, Any]],
    probe: dict[str, Any] | None = None,
    fractions: Sequence[float] = (0.5, 0.9),
) -> dict[str, Any]:
    """Capacity, saturation point and the latency at fractions of saturation, for one run.

    `saturation_images_per_s` is the reference the fractions refer to: the closed-loop probe's
    steady throughput when the run had one (its open-loop stages were then planned as fractions of
    it, `fraction` in each stage), else the saturation point (req/s) times images per request.
    `at[f]` is the open-loop stage planned at that fraction, else the one whose offered rate is
    nearest to f x the reference (within 25 % of it), else None.
    """
    poisson = [s for s in stages if s.get("mode") == "poisson"]
    rates = [s.get("steady_images_per_s") or s.get("achieved_images_per_s") or 0.0 for s in stages]
    capacity = max(rates) if rates else None
    sat_rps = saturation_point(stages)
    ipr = None
    for s in stages:
        if s.get("ok") and s.get("achieved_rps"):
            ipr = s["achieved_images_per_s"] / s["achieved_rps"]
            break
    ipr = ipr or 1.0
    sat_point_ips = sat_rps * ipr if sat_rps is not None else None
    if probe and probe.get("steady_images_per_s"):
        reference, ref_rps, source = probe["steady_images_per_s"], probe["steady_rps"], "probe"
    elif sat_rps is not None:
        reference, ref_rps, source = sat_point_ips, sat_rps, "saturation_point"
    else:
        reference, ref_rps, source = None, None, None
    at: dict[str, Any] = {}
    for f in fractions:
        chosen = next((s for s in poisson if s.get("fraction") is not None and abs(s["fraction"] - f) < 1e-9), None)
        if chosen is None and ref_rps and poisson:
            target = f * ref_rps
            near = min(poisson, key=lambda s: abs((s.get("offered_rps") or 0.0) - target))
            if abs((near.get("offered_rps") or 0.0) - target) <= 0.25 * target:
                chosen = near
        at[f"{f:g}"] = _stage_brief(chosen) if chosen is not None else None
    return {
        "reference": source,
        "saturation_images_per_s": reference,
        "saturation_rps": ref_rps,
        "capacity_images_per_s": capacity,
        "saturation_point_rps": sat_rps,
        "saturation_point_images_per_s": sat_point_ips,
        "images_per_request": ipr,
        "at": at,
    }
