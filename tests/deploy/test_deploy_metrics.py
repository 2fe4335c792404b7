"""Every PromQL expression in deploy/ (Grafana dashboard, alert rules, KEDA trigger, HPA adapter)
queries only metrics the server exports; with promtool installed, each one also parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS_BUILTINS = {"up"}  # series Prometheus makes itself
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
}
_HIST_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries
    e = _GROUPING.sub(" ", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)  # $__rate_interval, ${var}
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", e):
        ident, call = m.group(1), m.group(2)
        if call or ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return names


def unknown_metrics(names: set[str], server_metrics: dict[str, str]) -> set[str]:
    bad = set()
    for n in names:
        if n in server_metrics or n in PROMETHEUS_BUILTINS:
            continue
        base = next((n[: -len(s)] for s in _HIST_SUFFIXES if n.endswith(s)), None)
        if base is not None and server_metrics.get(base) == "histogram":
            continue
        bad.add(n)
    return bad


def test_extractor_on_known_shapes():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (instance, le) (rate(adsa_x_bucket{le="+Inf", a=~"b|c"}[5m])))'
    ) == {"adsa_x_bucket"}
    assert promql_metric_names("up{job='a'} == 0 or absent(up{job='a'})") == {"up"}
    assert promql_metric_names("a / on(instance) group_left b offset 5m > bool 1e9") == {"a", "b"}
    assert promql_metric_names('sum(rate(m_total{instance=~"$instance"}[$__rate_interval]))') == {"m_total"}
    assert (
        unknown_metrics(
            {"adsa_batch_size_bucket", "adsa_images_generated_total", "up"},
            {"adsa_batch_size": "histogram", "adsa_images_generated_total": "counter"},
        )
        == set()
    )
    assert unknown_metrics(
        {"adsa_images_generated", "adsa_kv_cache_usage_ratio_bucket"},
        {"adsa_images_generated_total": "counter", "adsa_kv_cache_usage_ratio": "gauge"},
    ) == {"adsa_images_generated", "adsa_kv_cache_usage_ratio_bucket"}


# ---- where the expressions are -------------------------------------------------------------------


def dashboard_exprs(repo: Path) -> dict[str, str]:
    d = json.loads((repo / "deploy/grafana/dashboards/adsa-serve.json").read_text())
    out = {}
    for p in d["panels"]:
        for t in p.get("targets", []):
            out[f"panel {p['title']!r} {t['refId']}"] = t["expr"]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
            assert m, f"unexpected variable query {query!r}"
            out[f"variable {var['name']}"] = m.group(1)
    return out


def alert_exprs(repo: Path) -> dict[str, str]:
    rules = yaml.safe_load((repo / "deploy/prometheus/alerts.yml").read_text())
    return {f"alert {r['alert']}": r["expr"] for g in rules["groups"] for r in g["rules"]}


def autoscaler_exprs(repo: Path) -> dict[str, str]:
    so = yaml.safe_load((repo / "deploy/k8s/base/scaledobject.yaml").read_text())
    out = {f"ScaledObject trigger {i}": t["metadata"]["query"] for i, t in enumerate(so["spec"]["triggers"])}
    values = yaml.safe_load(
        (repo / "deploy/k8s/overlays/hpa-prometheus-adapter/prometheus-adapter-values.yaml").read_text()
    )
    for i, rule in enumerate(values["rules"]["custom"]):
        out[f"adapter rule {i} seriesQuery"] = rule["seriesQuery"]
        series = rule["seriesQuery"].split("{")[0]
        out[f"adapter rule {i} metricsQuery"] = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="adsa"')
            .replace("<<.GroupBy>>", "pod")
        )
    hpa = yaml.safe_load((repo / "deploy/k8s/overlays/hpa-prometheus-adapter/hpa.yaml").read_text())
    for i, m in enumerate(hpa["spec"]["metrics"]):
        out[f"HPA metric {i}"] = m[m["type"].lower()]["metric"]["name"]
    return out


def all_exprs(repo: Path) -> dict[str, str]:
    return {**dashboard_exprs(repo), **alert_exprs(repo), **autoscaler_exprs(repo)}


@pytest.mark.parametrize("source", [dashboard_exprs, alert_exprs, autoscaler_exprs])
def test_only_server_metrics_are_queried(repo, server_metrics, source):
    exprs = source(repo)
    assert exprs
    problems = {}
    for where, expr in exprs.items():
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        bad = unknown_metrics(names, server_metrics)
        if bad:
            problems[where] = sorted(bad)
    assert not problems, f"metrics the server does not export: {problems}"


def test_dashboard_covers_the_operational_signals(repo):
    used = set()
    for expr in dashboard_exprs(repo).values():
        used |= promql_metric_names(expr)
    required = {
        "adsa_images_generated_total",
        "adsa_tokens_generated_total",
        "adsa_num_requests_waiting",
        "adsa_num_requests_running",
        "adsa_request_latency_seconds_bucket",
        "adsa_queue_time_seconds_bucket",
        "adsa_kv_cache_usage_ratio",
        "adsa_kv_evictions_total",
        "adsa_kv_spilled_bytes_total",
        "adsa_gpu_memory_allocated_bytes",
        "adsa_gpu_memory_reserved_bytes",
        "adsa_gpu_memory_used_bytes",
        "adsa_decode_step_seconds_bucket",
        "adsa_batch_size_bucket",
    }
    assert required <= used, sorted(required - used)
    latency = [e for e in dashboard_exprs(repo).values() if "adsa_request_latency_seconds_bucket" in e]
    assert {re.search(r"histogram_quantile\(([\d.]+)", e).group(1) for e in latency} >= {"0.5", "0.9", "0.99"}


def test_autoscaling_uses_the_queue(repo):
    for where, expr in autoscaler_exprs(repo).items():
        assert "adsa_num_requests_waiting" in promql_metric_names(expr), where


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')")
def test_every_expression_parses_with_promtool(repo, tmp_path):
    # each expression becomes a recording rule; `promtool check rules` parses them all
    rules = []
    for i, (where, expr) in enumerate(all_exprs(repo).items()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        rules.append({"record": f"check:expr_{i}", "expr": concrete, "labels": {"where": where[:60]}})
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "deploy-exprs", "rules": rules}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
