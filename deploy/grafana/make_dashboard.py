"""Generate deploy/grafana/dashboards/adsa-serve.json (the provisioned Grafana dashboard).

    python deploy/grafana/make_dashboard.py          # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check  # exit 1 if the JSON is stale

The dashboard is code so that its PromQL stays reviewable and testable: tests/deploy checks that
the committed JSON equals this script's output and that every metric it queries is one the
server exports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "adsa-serve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'  # every query is filtered by the instance variable
RATE = "$__rate_interval"


def q(expr: str, legend: str = "", ref: str = "A") -> dict:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}


def quantiles(metric: str, qs=(0.5, 0.9, 0.99), by: str = "") -> list[dict]:
    group = f"{by}, le" if by else "le"
    out = []
    for i, qq in enumerate(qs):
        expr = f"histogram_quantile({qq}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))"
        label = f"p{int(qq * 100)}" + (f" {{{{{by}}}}}" if by else "")
        out.append(q(expr, label, ref=chr(ord("A") + i)))
    return out


class Layout:
    """Places panels left to right in a 24-column grid, starting a new line when full."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
        self.panels.append(
            {
                "id": self._id(),
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1
        self.x, self.row_h = 0, 0

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        panel = {"id": self._id(), **panel, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def timeseries(
    title: str,
    targets: list[dict],
    unit: str,
    description: str,
    *,
    stack: bool = False,
    max_: float | None = None,
) -> dict:
    defaults: dict = {
        "unit": unit,
        "min": 0,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }


def stat(
    title: str,
    expr: str,
    unit: str,
    description: str,
    *,
    thresholds: list | None = None,
    decimals: int | None = None,
) -> dict:
    steps = [{"color": "green", "value": None}]
    for value, color in thresholds or []:
        steps.append({"color": color, "value": value})
    defaults: dict = {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
        "targets": [q(expr)],
    }


def build() -> dict:
    L = Layout()
    L.row("Overview")
    L.add(
        stat(
            "Images/s",
            f"sum(rate(adsa_images_generated_total{{{SEL}}}[{RATE}]))",
            "short",
            "Images finished per second, all selected replicas.",
            decimals=2,
        ),
        4,
        4,
    )
    L.add(
        stat(
            "Tokens/s",
            f"sum(rate(adsa_tokens_generated_total{{{SEL}}}[{RATE}]))",
            "short",
            "Image tokens decoded per second.",
            decimals=0,
        ),
        4,
        4,
    )
    L.add(
        stat("Running", f"sum(adsa_num_requests_running{{{SEL}}})", "short", "Images being decoded now."),
        4,
        4,
    )
    L.add(
        stat(
            "Waiting",
            f"sum(adsa_num_requests_waiting{{{SEL}}})",
            "short",
            "Images waiting for admission. Sustained growth: add replicas (this is the autoscaling metric).",
            thresholds=[(32, "orange"), (128, "red")],
        ),
        4,
        4,
    )
    L.add(
        stat(
            "KV cache usage (max)",
            f"max(adsa_kv_cache_usage_ratio{{{SEL}}})",
            "percentunit",
            "Fullest replica's KV pool. Near 100 % admission waits for KV memory.",
            thresholds=[(0.85, "orange"), (0.95, "red")],
        ),
        4,
        4,
    )
    L.add(
        stat(
            "Replicas reporting",
            f"count(adsa_num_requests_running{{{SEL}}})",
            "short",
            "Replicas whose /metrics were scraped.",
        ),
        4,
        4,
    )

    L.row("Throughput")
    L.add(
        timeseries(
            "Images/s",
            [
                q(f"sum by (instance) (rate(adsa_images_generated_total{{{SEL}}}[{RATE}]))", "{{instance}}"),
                q(f"sum(rate(adsa_images_generated_total{{{SEL}}}[{RATE}]))", "total", "B"),
            ],
            "short",
            "Finished images per second, per replica and in total.",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Tokens/s",
            [
                q(f"sum by (instance) (rate(adsa_tokens_generated_total{{{SEL}}}[{RATE}]))", "{{instance}}"),
            ],
            "short",
            "Image tokens decoded per second (block_size tokens per image).",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Requests/s by outcome",
            [
                q(f"sum by (status) (rate(adsa_requests_total{{{SEL}}}[{RATE}]))", "engine {{status}}"),
                q(
                    f'sum by (status) (rate(adsa_http_requests_total{{{SEL}, route=~".*generate"}}[{RATE}]))',
                    "http {{status}}",
                    "B",
                ),
            ],
            "reqps",
            "Engine outcomes per image (ok, deadline, cancelled, error) and HTTP statuses of "
            "generate calls (429 = queue full, 503 = not ready/draining, 504 = deadline).",
        ),
        8,
        8,
    )

    L.row("Queue and latency")
    L.add(
        timeseries(
            "Queue depth",
            [
                q(f"sum by (instance) (adsa_num_requests_waiting{{{SEL}}})", "waiting {{instance}}"),
                q(f"sum by (instance) (adsa_num_requests_running{{{SEL}}})", "running {{instance}}", "B"),
            ],
            "short",
            "Images waiting for admission and being decoded, per replica.",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Image latency p50 / p90 / p99",
            quantiles("adsa_request_latency_seconds"),
            "s",
            "Arrival to finished image, per image (server side).",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Queue time and time to first preview",
            [
                *quantiles("adsa_queue_time_seconds", (0.5, 0.99)),
                *[
                    dict(t, refId=chr(ord(t["refId"]) + 2), legendFormat="preview " + t["legendFormat"])
                    for t in quantiles("adsa_time_to_first_preview_seconds", (0.5, 0.99))
                ],
            ],
            "s",
            "Queue: arrival to first decode step. Preview: arrival to the first partial image of a "
            "streamed request.",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "HTTP p99 duration by route",
            quantiles("adsa_http_request_duration_seconds", (0.99,), by="route"),
            "s",
            "Whole-response time per route (the whole stream for SSE).",
        ),
        12,
        8,
    )
    L.add(
        timeseries(
            "HTTP requests/s by route and status",
            [
                q(
                    f"sum by (route, status) (rate(adsa_http_requests_total{{{SEL}}}[{RATE}]))",
                    "{{route}} {{status}}",
                ),
            ],
            "reqps",
            "Every HTTP route, including probes and /metrics.",
        ),
        12,
        8,
    )

    L.row("KV cache")
    L.add(
        timeseries(
            "KV cache usage",
            [
                q(f"adsa_kv_cache_usage_ratio{{{SEL}}}", "{{instance}}"),
            ],
            "percentunit",
            "Used / capacity of each replica's KV pool.",
            max_=1,
        ),
        6,
        8,
    )
    L.add(
        timeseries(
            "KV evictions/s",
            [
                q(f"sum by (instance) (rate(adsa_kv_evictions_total{{{SEL}}}[{RATE}]))", "{{instance}}"),
            ],
            "short",
            "Slot overwrites per second (ADSA/window policies evict the most redundant token).",
        ),
        6,
        8,
    )
    L.add(
        timeseries(
            "KV spilled to CPU",
            [
                q(f"sum by (instance) (rate(adsa_kv_spilled_bytes_total{{{SEL}}}[{RATE}]))", "{{instance}}"),
            ],
            "Bps",
            "K/V bytes per second copied to pinned CPU memory on eviction.",
        ),
        6,
        8,
    )
    L.add(
        timeseries(
            "KV capacity",
            [
                q(f"adsa_kv_cache_capacity_tokens{{{SEL}}}", "{{instance}}"),
            ],
            "short",
            "KV pool size in token slots.",
        ),
        6,
        8,
    )

    L.row("GPU")
    L.add(
        timeseries(
            "GPU memory",
            [
                q(f"adsa_gpu_memory_allocated_bytes{{{SEL}}}", "allocated {{instance}}"),
                q(f"adsa_gpu_memory_reserved_bytes{{{SEL}}}", "reserved {{instance}}", "B"),
                q(f"adsa_gpu_memory_peak_bytes{{{SEL}}}", "peak {{instance}}", "C"),
                q(f"adsa_gpu_memory_used_bytes{{{SEL}}}", "used (NVML) {{instance}}", "D"),
                q(f"adsa_gpu_memory_total_bytes{{{SEL}}}", "total {{instance}}", "E"),
            ],
            "bytes",
            "torch allocator (allocated / reserved / peak) and the whole device per NVML "
            "(used / total, all processes).",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Decode step time",
            quantiles("adsa_decode_step_seconds", (0.5, 0.99)),
            "s",
            "Wall time of one engine decode step (one token for every running image).",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "Batch size",
            [
                q(
                    f"sum(rate(adsa_batch_size_sum{{{SEL}}}[{RATE}]))"
                    f" / sum(rate(adsa_batch_size_count{{{SEL}}}[{RATE}]))",
                    "mean",
                ),
                *[dict(t, refId=chr(ord(t["refId"]) + 1)) for t in quantiles("adsa_batch_size", (0.5, 0.99))],
            ],
            "short",
            "Rows (images) per decode step: low batch at high load means KV memory or queue limits.",
        ),
        8,
        8,
    )
    L.add(
        timeseries(
            "VQ decode chunk fill",
            [
                q(
                    f"sum(rate(adsa_images_generated_total{{{SEL}}}[{RATE}]))"
                    f" / sum(rate(adsa_image_decode_chunks_total{{{SEL}}}[{RATE}]))",
                    "images per chunk",
                )
            ],
            "short",
            "Finished images per VQ decode (each padded to 16 on a GPU): near 16 under load; a low fill under "
            "load spends GPU time on padding.",
        ),
        8,
        8,
    )

    return {
        "uid": "adsa-serve",
        "title": "adsa-serve",
        "description": "LlamaGen image generation with an ADSA sparse KV cache: throughput, queue, latency, "
        "KV cache and GPU memory. Generated by deploy/grafana/make_dashboard.py.",
        "tags": ["adsa-serve", "llamagen"],
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                },
                {
                    "name": "instance",
                    "label": "Replica",
                    "type": "query",
                    "datasource": DS,
                    "query": {
                        "query": "label_values(adsa_num_requests_running, instance)",
                        "refId": "instance",
                    },
                    "definition": "label_values(adsa_num_requests_running, instance)",
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {},
                    "hide": 0,
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                    "options": [],
                },
            ]
        },
        "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
