"""Writing a run to disk: raw JSONL, summary.json, summary.md and PNG plots (matplotlib, no display).

Layout of an --out directory (what `compare` reads back):

    requests.jsonl            one line per request (runner.RequestRecord.to_json)
    metrics_timeseries.jsonl  gauges sampled from /metrics during the run
    metrics_before.txt        raw /metrics text before the first stage (absent if unreachable)
    metrics_after.txt         raw /metrics text after the last stage
    metrics_delta.json        counter deltas over the whole run, one entry per sample
    summary.json              config, per-stage statistics, saturation point, server-side deltas
    summary.md                the same for people, with the plots
    throughput_vs_offered.png achieved and goodput vs offered request rate (open-loop stages)
    throughput_vs_concurrency.png  (only with fixed-concurrency stages)
    latency_cdf.png           per-stage CDF of end-to-end latency of successful requests
    kv_usage.png              KV cache usage ratio and queue depth over time
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from . import __version__, promtext
from .runner import RunConfig, RunResult
from .stats import ecdf, is_error, saturation_point, saturation_summary

PLOTS = ("throughput_vs_offered.png", "latency_cdf.png", "kv_usage.png")


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _delta_json(before: str | None, after: str | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    try:
        deltas = promtext.counter_deltas(promtext.parse(before), promtext.parse(after))
    except promtext.ParseError as e:
        return {"error": str(e)}
    rows: list[dict[str, Any]] = []
    for (name, labels), v in sorted(deltas.items()):
        rows.append({"name": name, "labels": dict(labels), "delta": v})
    totals: dict[str, float] = {}
    for row in rows:
        if not row["name"].endswith("_bucket"):
            totals[row["name"]] = totals.get(row["name"], 0.0) + row["delta"]
    return {"totals": totals, "samples": rows}


def build_summary(cfg: RunConfig, result: RunResult) -> dict[str, Any]:
    stages = result.stages
    model = None
    if result.models:
        first = (result.models.get("data") or [{}])[0]
        model = {k: first.get(k) for k in ("id", "image_size", "num_classes", "policies") if k in first}
    totals = {
        "requests": len(result.records),
        "ok": sum(1 for r in result.records if r.get("ok")),
        "rejected_429": sum(1 for r in result.records if r.get("status") == 429),
        "errors": sum(1 for r in result.records if is_error(r)),
        "images": sum(int(r.get("images") or 0) for r in result.records if r.get("ok")),
    }
    delta = _delta_json(result.metrics_before, result.metrics_after)
    return {
        "tool": "adsa-loadtest",
        "version": __version__,
        "url": cfg.url,
        "started": _dt.datetime.fromtimestamp(result.started_unix, _dt.timezone.utc).isoformat(),
        "elapsed_s": result.elapsed_s,
        "hard_stopped": result.hard_stopped,
        "notes": result.notes,
        "slo_ms": cfg.slo_ms,
        "model": model,
        "config": cfg.to_json(),
        "stages": stages,
        "saturation_point_rps": saturation_point(stages),
        "probe": result.probe,
        "saturation": saturation_summary(stages, result.probe),
        "totals": totals,
        "top_errors": top_errors(result.records),
        "server_totals": delta["totals"] if delta and "totals" in delta else None,
    }


def top_errors(records: Sequence[dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    """The most common failures (429s apart), each with the server's or the client's own message: the counts
    alone say that requests failed, not why (a class the model does not have, a server that is not there)."""
    failed = Counter(
        (r.get("status"), str(r.get("error") or "unknown"), r.get("error_message") or "")
        for r in records
        if is_error(r)
    )
    return [{"status": status, "error": error, "message": message, "count": count}
            for (status, error, message), count in failed.most_common(n)]


def error_line(e: dict[str, Any]) -> str:
    """'3 x 422 invalid_value: class label 9999 is outside 0..1869'."""
    what = " ".join(str(x) for x in (e["status"], e["error"]) if x is not None)
    return f"{e['count']} x {what}" + (f": {e['message']}" if e["message"] else "")


def cell(v: Any, digits: int = 3) -> str:
    """A table cell: – for missing, yes/no, floats to `digits` significant digits (whole numbers from 1000)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        if 1000 <= abs(v) < 1e9:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _stage_table(stages: Sequence[dict[str, Any]]) -> list[str]:
    head = (
        "| stage | offered req/s (realised) | achieved req/s | images/s | steady images/s | goodput req/s "
        "| p50 s | p90 s | p99 s | ok | 429 | errors | SLO met |"
    )
    lines = [head, "|" + "---|" * 13]
    for s in stages:
        offered = (
            "–"
            if s.get("offered_rps") is None
            else (f"{cell(s['offered_rps'])} ({cell(s.get('offered_rps_realized'))})")
        )
        lines.append(
            f"| {s['label']} | {offered} | {cell(s['achieved_rps'])} | {cell(s['achieved_images_per_s'])} "
            f"| {cell(s.get('steady_images_per_s'))} | {cell(s['goodput_rps'])} | {cell(s['latency_p50_s'])} "
            f"| {cell(s['latency_p90_s'])} | {cell(s['latency_p99_s'])} | {s['ok']} | {s['rejected_429']} "
            f"| {s['errors']} | {cell(s['within_slo'])} |"
        )
    return lines


def _preview_table(stages: Sequence[dict[str, Any]]) -> list[str]:
    """Time to the first partial_image, for streamed runs (nothing when no stage saw one)."""
    rows = [s for s in stages if s.get("ttfp_p50_s") is not None]
    if not rows:
        return []
    lines = ["## Time to first preview (streamed)", "", "| stage | p50 s | p99 s |", "|---|---|---|"]
    lines += [f"| {s['label']} | {cell(s['ttfp_p50_s'])} | {cell(s.get('ttfp_p99_s'))} |" for s in rows]
    return [*lines, ""]


def _server_table(stages: Sequence[dict[str, Any]]) -> list[str]:
    rows = [s for s in stages if s.get("server")]
    if not rows:
        return ["No server-side metrics (the /metrics scrapes failed or were disabled)."]
    lines = [
        "| stage | images | tokens/s | KV evictions | spilled MiB | queue p50 s | queue p99 s "
        "| decode step p50 ms | batch size mean |",
        "|" + "---|" * 9,
    ]
    for s in rows:
        srv = s["server"]
        spilled = srv.get("adsa_kv_spilled_bytes_total")
        step = (srv.get("adsa_decode_step_seconds") or {}).get("p50")
        lines.append(
            f"| {s['label']} | {cell(srv.get('adsa_images_generated_total'))} "
            f"| {cell(srv.get('adsa_tokens_generated_per_s'))} | {cell(srv.get('adsa_kv_evictions_total'))} "
            f"| {cell(None if spilled is None else spilled / 2**20)} "
            f"| {cell((srv.get('adsa_queue_time_seconds') or {}).get('p50'))} "
            f"| {cell((srv.get('adsa_queue_time_seconds') or {}).get('p99'))} "
            f"| {cell(None if step is None else step * 1000)} "
            f"| {cell((srv.get('adsa_batch_size') or {}).get('mean'))} |"
        )
    return lines


def _saturation_lines(summary: dict[str, Any]) -> list[str]:
    sat = summary.get("saturation") or {}
    probe = summary.get("probe")
    lines = ["## Saturation", ""]
    if probe:
        lines.append(
            f"- capacity probe: {probe['concurrency']} closed-loop clients sustained "
            f"**{cell(probe['steady_images_per_s'])} images/s** ({cell(probe['steady_rps'])} req/s, "
            f"p50 {cell(probe['latency_p50_s'])} s, p99 {cell(probe['latency_p99_s'])} s); the open-loop "
            "stages `rate=FxCAP` offered F times that"
        )
    lines += [
        f"- capacity (most images/s any stage sustained): {cell(sat.get('capacity_images_per_s'))}",
        f"- saturation point (open loop): {cell(sat.get('saturation_point_rps'))} req/s = "
        f"{cell(sat.get('saturation_point_images_per_s'))} images/s",
        f"- reference for the fractions below: {sat.get('reference') or 'none'} = "
        f"{cell(sat.get('saturation_images_per_s'))} images/s",
        "",
        "| at | stage | offered images/s | achieved images/s | p50 s | p99 s | ok | 429 | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f, st in (sat.get("at") or {}).items():
        if st is None:
            lines.append(f"| {float(f):.0%} | – | – | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {float(f):.0%} | {st['label']} | {cell(st.get('offered_images_per_s'))} "
            f"| {cell(st.get('achieved_images_per_s'))} | {cell(st.get('latency_p50_s'))} "
            f"| {cell(st.get('latency_p99_s'))} | {st.get('ok')} | {st.get('rejected_429')} | {st.get('errors')} |"
        )
    return [*lines, ""]


def summary_markdown(summary: dict[str, Any], plots: Sequence[str]) -> str:
    sat = summary.get("saturation_point_rps")
    model = summary.get("model") or {}
    lines = [
        "# Load test report",
        "",
        f"- target: `{summary['url']}`, started {summary['started']}, ran {summary['elapsed_s']:.1f} s"
        + (" (hard stop reached)" if summary.get("hard_stopped") else ""),
        f"- model: {model.get('id', 'unknown')} (image size {model.get('image_size', '?')})",
        f"- SLO: p99 end-to-end latency <= {summary['slo_ms']:g} ms",
        f"- saturation point: **{cell(sat)} req/s**"
        if sat is not None
        else "- saturation point: none of the open-loop stages met both criteria",
        "  (highest offered rate with achieved >= 90 % of offered and p99 within the SLO)",
        "- totals: {requests} requests, {ok} ok, {rejected_429} rejected (429), {errors} errors, "
        "{images} images".format(**summary["totals"]),
        "",
        *_saturation_lines(summary),
        "## Per stage (client side)",
        "",
        *_stage_table(summary["stages"]),
        "",
        *_preview_table(summary["stages"]),
        "## Per stage (server side, from /metrics deltas)",
        "",
        *_server_table(summary["stages"]),
        "",
    ]
    if summary.get("top_errors"):
        lines += ["## Most common errors", "", *[f"- {error_line(e)}" for e in summary["top_errors"]], ""]
    if summary.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in summary["notes"]], ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_throughput(path: Path, runs: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Achieved (solid) and goodput (dashed) req/s vs offered req/s, one colour per run."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    top = 0.0
    for i, (name, summary) in enumerate(runs):
        stages = sorted((s for s in summary["stages"] if s["mode"] == "poisson"), key=lambda s: s["offered_rps"])
        if not stages:
            continue
        color = f"C{i}"
        x = [s.get("offered_rps_realized") or s["offered_rps"] for s in stages]
        ax.plot(x, [s["achieved_rps"] for s in stages], "o-", color=color, label=f"{name} achieved")
        ax.plot(x, [s["goodput_rps"] for s in stages], "s--", color=color, alpha=0.7, label=f"{name} goodput")
        sat = summary.get("saturation_point_rps")
        if sat is not None:
            ax.axvline(sat, color=color, linestyle=":", alpha=0.8, label=f"{name} saturation {sat:g}/s")
        top = max(top, *x)
    if top == 0:
        _empty(ax, "no open-loop (Poisson) stages")
    else:
        ax.plot([0, top], [0, top], color="grey", linewidth=0.8, label="achieved = offered")
        ax.set_xlabel("offered load (requests/s, realised)")
        ax.set_ylabel("throughput (requests/s)")
        ax.set_title("Throughput vs offered load")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def plot_concurrency(path: Path, runs: Sequence[tuple[str, dict[str, Any]]]) -> None:
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    ax2 = ax.twinx()
    for i, (name, summary) in enumerate(runs):
        stages = sorted((s for s in summary["stages"] if s["mode"] == "concurrency"), key=lambda s: s["concurrency"])
        if not stages:
            continue
        x = [s["concurrency"] for s in stages]
        ax.plot(x, [s["achieved_images_per_s"] for s in stages], "o-", color=f"C{i}", label=f"{name} images/s")
        ax2.plot(x, [s["latency_p99_s"] for s in stages], "x--", color=f"C{i}", alpha=0.6, label=f"{name} p99")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images/s (solid)")
    ax2.set_ylabel("p99 latency s (dashed)")
    ax.set_title("Closed loop: throughput and p99 vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def plot_latency_cdf(path: Path, runs: Sequence[tuple[str, list[dict[str, Any]]]], slo_s: float | None) -> None:
    """One curve per (run, stage); colours per run when there are several runs, per stage otherwise."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    drawn = 0
    lo, hi = float("inf"), 0.0
    for ri, (name, records) in enumerate(runs):
        stages: dict[str, list[float]] = {}
        for r in records:
            if r.get("ok") and r.get("latency_s") is not None:
                stages.setdefault(r["stage"], []).append(r["latency_s"])
        for si, (stage, lat) in enumerate(stages.items()):
            xs, ys = ecdf(lat)
            lo, hi = min(lo, xs[0]), max(hi, xs[-1])
            if len(runs) > 1:
                color, style, label = f"C{ri}", styles[si % len(styles)], f"{name} {stage}"
            else:
                color, style, label = f"C{si % 10}", "-", stage
            ax.step(xs, ys, where="post", color=color, linestyle=style, label=label)
            drawn += 1
    if not drawn:
        _empty(ax, "no successful requests")
    else:
        if slo_s:
            ax.axvline(slo_s, color="red", linewidth=0.8, label=f"SLO {slo_s:g}s")
        if lo > 0 and hi / lo > 50:
            ax.set_xscale("log")
        ax.set_xlabel("end-to-end latency (s)")
        ax.set_ylabel("fraction of successful requests")
        ax.set_title("Latency CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def plot_kv_usage(path: Path, runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> None:
    """KV cache usage ratio (left) and waiting/running requests (right) vs time."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    ax2 = ax.twinx()
    drawn = 0
    for ri, (name, ts) in enumerate(runs):
        rows = [r for r in ts if r.get("adsa_kv_cache_usage_ratio") is not None]
        prefix = f"{name} " if len(runs) > 1 else ""
        if rows:
            ax.plot(
                [r["t_s"] for r in rows],
                [r["adsa_kv_cache_usage_ratio"] for r in rows],
                color=f"C{ri}",
                label=f"{prefix}KV usage",
            )
            drawn += 1
        for gauge, style in (("adsa_num_requests_waiting", "--"), ("adsa_num_requests_running", ":")):
            g = [r for r in ts if r.get(gauge) is not None]
            if g:
                ax2.plot(
                    [r["t_s"] for r in g],
                    [r[gauge] for r in g],
                    color=f"C{ri}",
                    linestyle=style,
                    alpha=0.6,
                    label=prefix + gauge.removeprefix("adsa_num_requests_"),
                )
                drawn += 1
        if len(runs) == 1:  # shade the stages
            spans: dict[str, list[float]] = {}
            for r in ts:
                if r.get("stage"):
                    spans.setdefault(r["stage"], []).append(r["t_s"])
            for si, (stage, ts_) in enumerate(spans.items()):
                if si % 2 == 0:
                    ax.axvspan(min(ts_), max(ts_), color="grey", alpha=0.1)
                ax.text(min(ts_), 1.02, stage, fontsize=7, rotation=20, transform=ax.get_xaxis_transform())
    if not drawn:
        ax2.set_yticks([])
        _empty(ax, "no /metrics samples (server unreachable, no KV gauges, or --no-metrics)")
    else:
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("time since run start (s)")
        ax.set_ylabel("KV cache usage ratio (solid)")
        ax2.set_ylabel("requests waiting (dashed) / running (dotted)")
        ax.grid(alpha=0.3)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax.set_title("KV cache usage and queue over time", pad=18)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def write_run(out: Path, cfg: RunConfig, result: RunResult) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "requests.jsonl", result.records)
    write_jsonl(out / "metrics_timeseries.jsonl", result.timeseries)
    if result.metrics_before is not None:
        (out / "metrics_before.txt").write_text(result.metrics_before)
    if result.metrics_after is not None:
        (out / "metrics_after.txt").write_text(result.metrics_after)
    delta = _delta_json(result.metrics_before, result.metrics_after)
    (out / "metrics_delta.json").write_text(json.dumps(delta, indent=2, sort_keys=True) + "\n")
    summary = build_summary(cfg, result)
    plots = list(PLOTS)
    plot_throughput(out / "throughput_vs_offered.png", [("run", summary)])
    plot_latency_cdf(out / "latency_cdf.png", [("run", result.records)], cfg.slo_ms / 1000.0)
    plot_kv_usage(out / "kv_usage.png", [("run", result.timeseries)])
    if any(s["mode"] == "concurrency" for s in summary["stages"]):
        plot_concurrency(out / "throughput_vs_concurrency.png", [("run", summary)])
        plots.append("throughput_vs_concurrency.png")
    summary["plots"] = plots
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary, plots))
    return summary
