"""Command line: `python -m loadtest [run] [flags]` and `python -m loadtest compare RUN_A RUN_B --out DIR`."""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
from pathlib import Path

import httpx

from adsa_core.argtypes import non_negative_float, positive_float, positive_int

from .runner import RunConfig, Stage, run_sync
from .workload import COMMON_FIELDS, Workload, WorkloadError, load_workload_file, parse_csv, request_budget

DEFAULT_URL = "http://127.0.0.1:8000"

EPILOG = """\
modes:
  open loop   --rates 0.5,1,2,4      Poisson arrivals at each rate (requests/s), one stage per rate
  closed loop --concurrency 1,4,16   that many clients, each sending its next request when the last ends
  Both may be given: the rate stages run first. Every stage stops at --requests or --duration,
  whichever comes first; the whole run stops at --max-duration (in-flight requests are cancelled).
  capacity probe --probe-concurrency 128 --relative-rates 0.25,0.5,0.75,0.9,1.1,1.3
              first a closed-loop stage of that many clients (--probe-duration s) measures the
              steady throughput; then one Poisson stage at each fraction of it (labels rate=0.5xcap,
              ...), then any --rates / --concurrency stages. summary.json "saturation" gives the
              capacity and the latency at 50 % and 90 % of it.

workload (flags, or --workload FILE with the same keys; see loadtest/workload.py):
  --classes 207,360  --prompt "a red fox" --prompt "..."  --policies adsa,dense,default
  --budgets 256,512,default  --n 1,2   ('default' leaves the field to the server)
  Without classes or prompts, the classes listed by GET /v1/models are used.

outputs in --out: requests.jsonl, summary.json, summary.md, metrics_{before,after}.txt,
  metrics_delta.json, metrics_timeseries.jsonl, throughput_vs_offered.png, latency_cdf.png, kv_usage.png

compare two runs:
  python -m loadtest compare RUN_A RUN_B --out DIR [--labels base,new]

exit status: 0 done, 2 bad arguments, 3 no request succeeded.
"""


def _http_url(text: str) -> str:
    """A base URL the client can reach: http(s)://host[:port][/prefix] ('localhost:8000' would fail every request)."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"expected http://host:port or https://..., got {text!r}")
    return text


def build_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test an adsa-serve server over HTTP and write a report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url",
        type=_http_url,
        default=os.environ.get("ADSA_LOADTEST_URL", DEFAULT_URL),
        help=f"server base URL, the only address contacted (default {DEFAULT_URL})",
    )
    p.add_argument("--out", type=Path, default=None, help="output directory (default out/loadtest-<UTC timestamp>)")
    g = p.add_argument_group("stages and bounds")
    g.add_argument("--rates", default=None, help="open-loop Poisson rates, requests/s, comma separated "
                   "(without any stage flag: 0.5,1,2,4)")
    g.add_argument("--concurrency", default=None, help="closed-loop client counts, comma separated")
    g.add_argument("--requests", type=positive_int, default=100, help="max requests per stage (default 100)")
    g.add_argument(
        "--duration",
        type=positive_float,
        default=60.0,
        help="max seconds of new requests per stage (default 60)",
    )
    g.add_argument(
        "--max-duration",
        type=positive_float,
        default=900.0,
        help="hard stop for the whole run in seconds, in-flight requests included (default 900)",
    )
    g.add_argument("--timeout", type=positive_float, default=300.0, help="per-request timeout s (default 300)")
    g.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=None,
        help="wait at most this long for a stage's in-flight requests (default: --timeout)",
    )
    g.add_argument("--pause", type=non_negative_float, default=0.0, help="seconds between stages (default 0)")
    g.add_argument(
        "--max-inflight",
        type=positive_int,
        default=1024,
        help="open loop: arrivals beyond this many in flight count as client_overload",
    )
    g.add_argument(
        "--slo-ms",
        type=positive_float,
        default=10_000.0,
        help="latency target for goodput and the saturation point (default 10000)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the arrival schedule and the mix (default 0)")
    g.add_argument(
        "--probe-concurrency",
        type=positive_int,
        default=None,
        help="first run a closed-loop capacity probe with this many clients (e.g. 3 x the server's max batch: at 2 x "
        "the batch can run part-empty while finished images travel back to their clients)",
    )
    g.add_argument(
        "--probe-duration", type=positive_float, default=None, help="seconds of the probe (default --duration)"
    )
    g.add_argument(
        "--ramp",
        type=non_negative_float,
        default=0.0,
        help="closed loop: start the clients evenly over this many seconds (desynchronizes batch waves)",
    )
    g.add_argument(
        "--relative-rates",
        default=None,
        help="open-loop stages at these fractions of the probe's throughput, e.g. 0.25,0.5,0.75,0.9,1.1,1.3",
    )
    w = p.add_argument_group("workload")
    w.add_argument("--workload", type=Path, default=None, help="JSON workload file (overrides the flags below)")
    w.add_argument("--classes", default=None, help="class labels, comma separated")
    w.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    w.add_argument("--policies", default=None, help="KV policies to mix, e.g. adsa,dense,window,default")
    w.add_argument(
        "--budgets",
        default=None,
        help="kv_budget values to mix: tokens, fractions (0.25, 1/4) or full (no eviction), e.g. 256,0.25,default",
    )
    w.add_argument("--n", default="1", help="images per request to mix (default 1)")
    w.add_argument("--cfg-scale", type=non_negative_float, default=None)
    w.add_argument("--temperature", type=positive_float, default=None)
    w.add_argument("--top-k", type=int, default=None)
    w.add_argument("--top-p", type=positive_float, default=None)
    w.add_argument("--seed-base", type=int, default=0, help="request i is sent with seed seed_base + i")
    w.add_argument(
        "--stream", action="store_true", help="ask for server-sent events and time the first partial preview"
    )
    w.add_argument("--response-format", choices=["b64_json", "png"], default="b64_json")
    m = p.add_argument_group("metrics and output")
    m.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")
    m.add_argument("--metrics-url", type=_http_url, default=None, help="where to scrape (default URL/metrics)")
    m.add_argument(
        "--metrics-interval",
        type=positive_float,
        default=1.0,
        help="seconds between /metrics samples during the run (default 1)",
    )
    m.add_argument(
        "--api-key",
        default=os.environ.get("ADSA_LOADTEST_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default $ADSA_LOADTEST_API_KEY)",
    )
    m.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return p


def build_compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest compare",
        description="Put two load-test runs side by side (table + overlaid plots).",
    )
    p.add_argument("run_a", type=Path, help="--out directory of the first run (the baseline)")
    p.add_argument("run_b", type=Path, help="--out directory of the second run")
    p.add_argument("--out", type=Path, required=True, help="directory for compare.md, compare.json and plots")
    p.add_argument("--labels", default=None, help="names for the two runs, e.g. dense,adsa")
    return p


def _discover_classes(url: str, api_key: str | None) -> list[int]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", timeout=10.0, headers=headers, trust_env=False)
        first = (r.json().get("data") or [{}])[0]
    except (httpx.HTTPError, ValueError, AttributeError, IndexError):
        return []
    classes = [c["id"] for c in first.get("classes") or [] if isinstance(c, dict) and "id" in c]
    if not classes and isinstance(first.get("num_classes"), int):
        classes = list(range(first["num_classes"]))
    return [int(c) for c in classes]


def workload_from_args(args: argparse.Namespace) -> Workload:
    if args.workload is not None:
        wl = load_workload_file(args.workload)
    else:
        wl = Workload(
            classes=parse_csv(args.classes, int),
            prompts=list(args.prompt),
            policies=parse_csv(args.policies) or [None],
            kv_budgets=parse_csv(args.budgets, request_budget) or [None],
            n=[k for k in parse_csv(args.n, int) if k is not None] or [1],
            seed_base=args.seed_base,
        )
    for name in COMMON_FIELDS:
        value = getattr(args, name)
        if value is not None:
            wl.common[name] = value
    if not wl.mix and not wl.classes and not wl.prompts:
        wl.classes = _discover_classes(args.url, args.api_key) or [0]
    wl.validate()
    return wl


def _flag_list(args: argparse.Namespace, name: str, cast: type) -> list:
    """A comma-list flag, its error naming the flag ('--rates: could not convert ...')."""
    try:
        return parse_csv(getattr(args, name), cast)
    except ValueError as e:
        raise ValueError(f"--{name.replace('_', '-')}: {e}") from None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    stages = [Stage("poisson", float(r)) for r in _flag_list(args, "rates", float)]
    stages += [Stage("concurrency", float(c)) for c in _flag_list(args, "concurrency", int)]
    relative = [float(f) for f in _flag_list(args, "relative_rates", float)]
    if relative and not args.probe_concurrency:
        raise ValueError("--relative-rates needs --probe-concurrency (the probe measures what they are relative to)")
    if any(f is None or not 0 < f < math.inf for f in relative):  # nan fails both comparisons
        raise ValueError("--relative-rates must all be finite and > 0")
    if not stages and not args.probe_concurrency:
        stages = [Stage("poisson", r) for r in (0.5, 1.0, 2.0, 4.0)]
    for s in stages:
        if s.value is None or not 0 < s.value < math.inf:  # nan fails both comparisons
            raise ValueError(f"stage {s.label}: rates and concurrencies must be finite and > 0")
    out = args.out or Path("out") / ("loadtest-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    return RunConfig(
        url=args.url,
        out=out,
        stages=stages,
        requests_per_stage=args.requests,
        stage_duration_s=args.duration,
        max_duration_s=args.max_duration,
        timeout_s=args.timeout,
        drain_timeout_s=args.drain_timeout,
        pause_s=args.pause,
        slo_ms=args.slo_ms,
        stream=args.stream,
        response_format=args.response_format,
        metrics=not args.no_metrics,
        metrics_url=args.metrics_url,
        metrics_interval_s=args.metrics_interval,
        max_inflight=args.max_inflight,
        seed=args.seed,
        api_key=args.api_key,
        workload=workload_from_args(args),
        progress=not args.quiet,
        probe_concurrency=args.probe_concurrency,
        ramp_s=max(0.0, args.ramp),
        probe_duration_s=args.probe_duration,
        relative_rates=relative,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from .compare import CompareError, compare_runs

        cargs = build_compare_parser().parse_args(argv[1:])
        labels = None
        if cargs.labels:
            parts = [p.strip() for p in cargs.labels.split(",")]
            if len(parts) != 2:
                build_compare_parser().error("--labels takes two names, e.g. dense,adsa")
            labels = (parts[0], parts[1])
        try:
            compare_runs(cargs.run_a, cargs.run_b, cargs.out, labels)
        except CompareError as e:
            print(f"loadtest compare: {e}", file=sys.stderr)
            return 2
        print(f"wrote {cargs.out / 'compare.md'}", file=sys.stderr)
        return 0
    if argv and argv[0] == "run":
        argv = argv[1:]
    parser = build_run_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, WorkloadError) as e:
        parser.error(str(e))
    from .report import error_line, write_run  # matplotlib is imported only when a run is written

    result = run_sync(cfg)
    summary = write_run(cfg.out, cfg, result)
    sat = summary["saturation"]
    rps, capacity = summary["saturation_point_rps"], sat["capacity_images_per_s"]
    print(
        f"wrote {cfg.out / 'summary.md'} (saturation point: {'not reached' if rps is None else f'{rps} req/s'}; "
        f"capacity: {'none measured' if capacity is None else f'{capacity:.2f} images/s'})",
        file=sys.stderr,
    )
    for failure in summary["top_errors"][:3]:
        print(f"errors: {error_line(failure)}", file=sys.stderr)
    return 0 if summary["totals"]["ok"] > 0 else 3
