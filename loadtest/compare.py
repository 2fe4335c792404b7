"""`python -m loadtest compare RUN_A RUN_B --out DIR`: two runs side by side.

Reads each run's summary.json, requests.jsonl and metrics_timeseries.jsonl; writes compare.md,
compare.json and overlaid plots (throughput vs offered load, latency CDF, KV usage over time).
Stages are matched by label (e.g. `rate=2`, `concurrency=8`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report import cell, plot_concurrency, plot_kv_usage, plot_latency_cdf, plot_throughput, read_jsonl

COMPARED = (
    ("achieved_rps", "achieved req/s", True),
    ("achieved_images_per_s", "images/s", True),
    ("goodput_rps", "goodput req/s", True),
    ("latency_p50_s", "p50 s", False),
    ("latency_p90_s", "p90 s", False),
    ("latency_p99_s", "p99 s", False),
    ("rejected_429", "429s", False),
    ("errors", "errors", False),
)


class CompareError(ValueError):
    pass


def load_run(path: Path) -> dict[str, Any]:
    summary_path = path / "summary.json"
    if not summary_path.exists():
        raise CompareError(f"{path} holds no summary.json: not a loadtest --out directory")
    return {
        "summary": json.loads(summary_path.read_text()),
        "records": read_jsonl(path / "requests.jsonl"),
        "timeseries": read_jsonl(path / "metrics_timeseries.jsonl"),
    }


def _change(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a == 0:
        return "–"
    return f"{(b - a) / abs(a) * 100:+.1f}%"


def compare_runs(run_a: Path, run_b: Path, out: Path, labels: tuple[str, str] | None = None) -> dict[str, Any]:
    a, b = load_run(run_a), load_run(run_b)
    name_a, name_b = labels or (run_a.name or str(run_a), run_b.name or str(run_b))
    if name_a == name_b:
        name_a, name_b = f"A:{name_a}", f"B:{name_b}"
    out.mkdir(parents=True, exist_ok=True)
    stages_a = {s["label"]: s for s in a["summary"]["stages"]}
    stages_b = {s["label"]: s for s in b["summary"]["stages"]}
    order = list(stages_a) + [k for k in stages_b if k not in stages_a]
    rows = []
    for label in order:
        sa, sb = stages_a.get(label), stages_b.get(label)
        row: dict[str, Any] = {"stage": label}
        for key, _, _ in COMPARED:
            va = sa.get(key) if sa else None
            vb = sb.get(key) if sb else None
            row[key] = {"a": va, "b": vb, "change": _change(va, vb)}
        rows.append(row)
    result: dict[str, Any] = {
        "a": {
            "name": name_a,
            "path": str(run_a),
            "saturation_point_rps": a["summary"].get("saturation_point_rps"),
        },
        "b": {
            "name": name_b,
            "path": str(run_b),
            "saturation_point_rps": b["summary"].get("saturation_point_rps"),
        },
        "slo_ms": {"a": a["summary"].get("slo_ms"), "b": b["summary"].get("slo_ms")},
        "saturation": {"a": a["summary"].get("saturation"), "b": b["summary"].get("saturation")},
        "stages": rows,
        "plots": ["throughput_vs_offered.png", "latency_cdf.png", "kv_usage.png"],
    }
    plot_throughput(out / "throughput_vs_offered.png", [(name_a, a["summary"]), (name_b, b["summary"])])
    slo = a["summary"].get("slo_ms")
    plot_latency_cdf(
        out / "latency_cdf.png",
        [(name_a, a["records"]), (name_b, b["records"])],
        slo / 1000.0 if slo else None,
    )
    plot_kv_usage(out / "kv_usage.png", [(name_a, a["timeseries"]), (name_b, b["timeseries"])])
    if any(s["mode"] == "concurrency" for s in [*stages_a.values(), *stages_b.values()]):
        plot_concurrency(out / "throughput_vs_concurrency.png", [(name_a, a["summary"]), (name_b, b["summary"])])
        result["plots"].append("throughput_vs_concurrency.png")
    (out / "compare.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "compare.md").write_text(compare_markdown(result))
    return result


def compare_markdown(result: dict[str, Any]) -> str:
    a, b = result["a"], result["b"]
    lines = [
        f"# Load test comparison: {a['name']} vs {b['name']}",
        "",
        f"- A = `{a['path']}`, B = `{b['path']}`",
        f"- saturation point: A {cell(a['saturation_point_rps'])} req/s, B {cell(b['saturation_point_rps'])} req/s",
        f"- SLO (ms): A {cell(result['slo_ms']['a'])}, B {cell(result['slo_ms']['b'])}",
    ]
    sat_a, sat_b = (result.get("saturation") or {}).get("a") or {}, (result.get("saturation") or {}).get("b") or {}
    if sat_a or sat_b:
        cap_a, cap_b = sat_a.get("capacity_images_per_s"), sat_b.get("capacity_images_per_s")
        lines.append(f"- capacity (images/s): A {cell(cap_a)}, B {cell(cap_b)} ({_change(cap_a, cap_b)})")
        for f in sorted(set(sat_a.get("at") or {}) | set(sat_b.get("at") or {}), key=float):
            p99 = [((s.get("at") or {}).get(f) or {}).get("latency_p99_s") for s in (sat_a, sat_b)]
            lines.append(f"- p99 at {float(f):.0%} of saturation (s): A {cell(p99[0])}, B {cell(p99[1])}")
    lines.append("")
    lines.append("Each cell: A → B (change).")
    lines.append("")
    lines.append("| stage | " + " | ".join(title for _, title, _ in COMPARED) + " |")
    lines.append("|" + "---|" * (1 + len(COMPARED)))
    for row in result["stages"]:
        cells = []
        for key, _, _ in COMPARED:
            c = row[key]
            change = "" if c["change"] == "–" else f" ({c['change']})"
            cells.append(f"{cell(c['a'])} → {cell(c['b'])}{change}")
        lines.append(f"| {row['stage']} | " + " | ".join(cells) + " |")
    lines += ["", "Higher is better for req/s, images/s and goodput; lower for latency, 429s and errors.", ""]
    lines += [f"![{p}]({p})" for p in result["plots"]] + [""]
    return "\n".join(lines)
