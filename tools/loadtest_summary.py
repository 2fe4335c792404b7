"""Results of tools/device_loadtest.sh: the scale-out verdict and the markdown tables for the docs.

    python3 tools/loadtest_summary.py table OUT            # markdown for docs/PERFORMANCE.md (stdout)
    python3 tools/loadtest_summary.py scaleout OUT/lt/scale-1 OUT/lt/scale-2 --out OUT/scaleout.json
    python3 tools/loadtest_summary.py better-policy OUT    # dense or adsa: the higher capacity
    python3 tools/loadtest_summary.py fetch URL FILE       # save a /metrics page (stdlib only)
    python3 tools/loadtest_summary.py env --out OUT/env.json  # card, torch, settings (ADSA_LT_*)

The layout of OUT (written by the script): lt/dense and lt/adsa are `python -m loadtest` runs with a
capacity probe and open-loop stages at fractions of it; lt/scale-1 and lt/scale-2 are closed-loop
runs through the balancer in front of one and of two replicas, each replica-*-{before,after}.txt
beside them a /metrics page of that replica; scaleout.json; env.json.

Numbers: saturation = the closed-loop probe's steady throughput (images/s with 2 x max-batch
clients, completions between warm-up and the last send); "at 50 %" and "at 90 %" = the Poisson
stages offered at those fractions of it; the open-loop saturation point (the highest offered rate
still served at >= 90 % within the SLO) is given beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from loadtest.report import cell

SCALE_TARGET = 1.8
POLICIES = ("dense", "adsa")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def images_total(metrics_text: str) -> float | None:
    """adsa_images_generated_total summed over label sets, from a Prometheus text page."""
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        m = re.match(r"adsa_images_generated_total(\{[^}]*\})?\s+(\S+)", line)
        if m:
            total += float(m.group(2))
            seen = True
    return total if seen else None


def closed_loop(run: Path) -> dict[str, Any] | None:
    """The (last) closed-loop stage of a loadtest run: its steady throughput and latency."""
    summary = _load(run / "summary.json")
    if not summary:
        return None
    stages = [s for s in summary.get("stages", []) if s.get("mode") == "concurrency"]
    if not stages:
        return None
    s = stages[-1]
    return {
        "run": str(run),
        "url": summary.get("url"),
        "concurrency": s.get("concurrency"),
        "images_per_s": s.get("steady_images_per_s"),
        "images_per_s_whole_stage": s.get("achieved_images_per_s"),
        "latency_p50_s": s.get("latency_p50_s"),
        "latency_p99_s": s.get("latency_p99_s"),
        "ok": s.get("ok"),
        "rejected_429": s.get("rejected_429"),
        "errors": s.get("errors"),
        "errors_by_kind": s.get("errors_by_kind"),
        "duration_s": s.get("elapsed_s"),
    }


def replica_split(run: Path) -> dict[str, float] | None:
    """Images each replica generated during a run, from replica-NAME-{before,after}.txt beside it."""
    out: dict[str, float] = {}
    for before in sorted(run.glob("replica-*-before.txt")):
        name = before.name.removeprefix("replica-").removesuffix("-before.txt")
        after = run / f"replica-{name}-after.txt"
        if not after.exists():
            continue
        b, a = images_total(before.read_text()), images_total(after.read_text())
        if a is not None and b is not None:
            out[name] = a - b
    return out or None


def scaleout(one: Path, two: Path, extra: dict[str, Any] | None = None, direct: Path | None = None) -> dict[str, Any]:
    r1, r2 = closed_loop(one), closed_loop(two)
    ips1 = r1 and r1.get("images_per_s")
    ips2 = r2 and r2.get("images_per_s")
    ratio = ips2 / ips1 if ips1 and ips2 else None
    result: dict[str, Any] = {
        "one_replica": r1,
        "two_replicas": r2,
        "one_replica_images_per_s": ips1,
        "two_replicas_images_per_s": ips2,
        "ratio": ratio,
        "target": SCALE_TARGET,
        "meets_target": ratio is not None and ratio >= SCALE_TARGET,
        "images_per_replica_during_two": replica_split(two),
        "one_replica_direct": closed_loop(direct) if direct is not None else None,
        "method": "closed loop through the balancer, 2 x max-batch clients per replica; steady throughput "
        "(completions between warm-up and the last send)",
    }
    result.update(extra or {})
    return result


def better_policy(out: Path) -> str:
    caps = {}
    for p in POLICIES:
        s = _load(out / "lt" / p / "summary.json") or {}
        caps[p] = (s.get("saturation") or {}).get("capacity_images_per_s") or 0.0
    return "dense" if caps["dense"] > caps["adsa"] else "adsa"


def _policy_row(out: Path, policy: str, label: str) -> str:
    s = _load(out / "lt" / policy / "summary.json")
    if not s:
        return f"| {label} | no run | | | | | | |"
    sat = s.get("saturation") or {}
    at = sat.get("at") or {}
    totals = s.get("totals") or {}

    def lat(f: str) -> str:
        st = at.get(f)
        if not st:
            return "–"
        return f"{cell(st.get('latency_p50_s'))} / {cell(st.get('latency_p99_s'))}"

    evictions = (s.get("server_totals") or {}).get("adsa_kv_evictions_total")
    return (
        f"| {label} | {cell(sat.get('saturation_images_per_s'))} | {cell(sat.get('saturation_point_images_per_s'))} "
        f"| {cell(sat.get('capacity_images_per_s'))} | {lat('0.5')} | {lat('0.9')} "
        f"| {totals.get('rejected_429', '–')} / {totals.get('errors', '–')} | {cell(evictions)} |"
    )


def table(out: Path) -> str:
    env = _load(out / "env.json") or {}
    lt = env.get("settings") or {}
    model = lt.get("model", "?") + (f" {lt['image_size']} px" if lt.get("image_size") else "")
    graphs = "CUDA graphs on" if lt.get("device", "cuda") == "cuda" else "CPU"
    lines = [
        f"Load test (`tools/device_loadtest.sh`), {env.get('date', '?')}: {env.get('gpus', '?')}, "
        f"torch {env.get('torch', '?')}, commit {env.get('commit', '?')}.",
        f"Model {model} ({lt.get('weights', '?')}), CFG {lt.get('cfg_scale', '?')}, top-k "
        f"{lt.get('top_k') or 'off'}, max batch {lt.get('max_batch', '?')} images, {graphs}, no torch.compile; "
        "one server per GPU on 127.0.0.1, load tester on the same host (`python -m loadtest`).",
        "",
        "One GPU: saturation = closed-loop probe with "
        f"{lt.get('concurrency', '2 x max batch')} clients (steady images/s); 50 % / 90 % = Poisson "
        f"arrivals at that fraction of it, {lt.get('stage_s', '?')} s each; open-loop saturation point = "
        "highest offered rate served at >= 90 % with p99 within "
        f"{cell(float(lt['slo_ms']) / 1000 if lt.get('slo_ms') else None)} s.",
        "",
        "| policy | saturation (images/s) | open-loop saturation point (images/s) | most images/s of any stage "
        "| p50 / p99 at 50 % (s) | p50 / p99 at 90 % (s) | 429s / errors (whole run) | KV evictions |",
        "|---|---|---|---|---|---|---|---|",
        _policy_row(out, "dense", "dense"),
        _policy_row(out, "adsa", f"adsa, budget {lt.get('budget', '?')}"),
        "",
    ]
    sc = _load(out / "scaleout.json")
    if sc:
        lines += [
            f"Scale-out: policy {sc.get('policy', '?')}, balancer {sc.get('lb', '?')}, closed loop "
            f"{sc.get('duration_s', lt.get('scale_s', '?'))} s with 2 x max batch clients per replica, "
            f"clients started over {lt.get('ramp_s', '?')} s; steady images/s between warm-up and the last send; "
            f"{cell(sc.get('ratio'))}x (target >= {SCALE_TARGET}x: {'met' if sc.get('meets_target') else 'NOT met'}).",
            "",
            "| setup | clients | images/s | p50 (s) | p99 (s) | 429s / errors | images per replica |",
            "|---|---|---|---|---|---|---|",
        ]
        split = " / ".join(cell(v) for v in (sc.get("images_per_replica_during_two") or {}).values())
        rows = [
            ("one_replica", "1 replica (GPU 0) behind the balancer", ""),
            ("two_replicas", "2 replicas (GPU 0, GPU 1) behind the balancer", split),
        ]
        if sc.get("one_replica_direct"):
            rows.append(("one_replica_direct", "1 replica (GPU 0), no balancer (reference)", ""))
        for key, name, sp in rows:
            r = sc.get(key) or {}
            lines.append(
                f"| {name} | {cell(r.get('concurrency'))} | {cell(r.get('images_per_s'))} "
                f"| {cell(r.get('latency_p50_s'))} | {cell(r.get('latency_p99_s'))} "
                f"| {cell(r.get('rejected_429'))} / {cell(r.get('errors'))} | {sp or '–'} |"
            )
        lines += ["", f"Ratio two / one: **{cell(sc.get('ratio'))}x**.", ""]
    else:
        lines += ["Scale-out: no scaleout.json (the phase did not run; see run.log).", ""]
    return "\n".join(lines)


def fetch(url: str, path: Path, timeout: float = 10.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URL from the script
            path.write_bytes(r.read())
        return 0
    except OSError as e:
        print(f"fetch {url}: {e}", file=sys.stderr)
        return 1


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "settings": json.loads(os.environ.get("ADSA_LT_SETTINGS_JSON") or "{}"),
        "commit": os.environ.get("ADSA_LT_COMMIT") or "unknown",
    }
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = "--query-gpu=name,memory.total,driver_version"
            text = subprocess.run([smi, q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            names = [line.strip() for line in text.splitlines() if line.strip()]
            env["gpus"] = "; ".join(f"GPU {i}: {n}" for i, n in enumerate(names)) or None
        except (OSError, subprocess.SubprocessError):
            env["gpus"] = None
    env.setdefault("gpus", "no GPU (CPU run)")
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/loadtest_summary.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table")
    t.add_argument("out", type=Path)
    s = sub.add_parser("scaleout")
    s.add_argument("one", type=Path)
    s.add_argument("two", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--direct", type=Path, default=None, help="the same run against replica A without a balancer")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fields, e.g. lb=nginx")
    b = sub.add_parser("better-policy")
    b.add_argument("out", type=Path)
    f = sub.add_parser("fetch")
    f.add_argument("url")
    f.add_argument("path", type=Path)
    e = sub.add_parser("env")
    e.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "table":
        print(table(args.out))
    elif args.cmd == "scaleout":
        extra = dict(kv.split("=", 1) for kv in args.set)
        result = scaleout(args.one, args.two, extra, args.direct)
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(
            f"scale-out: one {cell(result['one_replica_images_per_s'])} images/s, two "
            f"{cell(result['two_replicas_images_per_s'])} images/s, ratio {cell(result['ratio'])} "
            f"(target {SCALE_TARGET}: {'met' if result['meets_target'] else 'not met'})"
        )
    elif args.cmd == "better-policy":
        print(better_policy(args.out))
    elif args.cmd == "fetch":
        return fetch(args.url, args.path)
    elif args.cmd == "env":
        args.out.write_text(json.dumps(environment(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
