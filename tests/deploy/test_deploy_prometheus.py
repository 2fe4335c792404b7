"""Prometheus config and alert rules: promtool (config, rules, rule unit tests) when installed,
and structural checks that always run."""

from __future__ import annotations

import shutil
import subprocess

import pytest

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (apt-get install prometheus); the YAML checks below still run",
)
REQUIRED_ALERTS = {"AdsaServeDown", "AdsaQueueGrowing", "AdsaLatencyP99High", "AdsaKVCacheNearlyFull"}


def _promtool(*args, cwd):
    r = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@needs_promtool
def test_promtool_check_config(repo):
    _promtool("check", "config", "prometheus.yml", cwd=repo / "deploy/prometheus")


@needs_promtool
def test_promtool_check_rules(repo):
    out = _promtool("check", "rules", "alerts.yml", cwd=repo / "deploy/prometheus")
    assert "SUCCESS" in out


@needs_promtool
def test_promtool_alert_unit_tests(repo):
    # alerts.test.yml: each alert fires on a synthetic series, with its exact labels and text
    _promtool("test", "rules", "alerts.test.yml", cwd=repo / "deploy/prometheus")


def test_prometheus_config_structure(repo, yaml_load):
    cfg = yaml_load(repo / "deploy/prometheus/prometheus.yml")
    for rf in cfg["rule_files"]:
        assert (repo / "deploy/prometheus" / rf).is_file(), rf
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["adsa-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["port"] == 8000 and sd["type"] == "A"
    # the DNS name is the network alias every server service of the compose files carries
    for f in ("compose.yaml", "compose.multi-gpu.yaml"):
        services = yaml_load(repo / "deploy" / f)["services"]
        for name, svc in services.items():
            if name.startswith("adsa-serve"):
                aliases = (svc.get("networks") or {}).get("default", {}).get("aliases")
                if aliases is None and f != "compose.yaml":  # extends copies it from compose.yaml
                    continue
                assert sd["names"][0] in aliases, (f, name)


def test_alert_rules_structure(repo, yaml_load):
    rules = yaml_load(repo / "deploy/prometheus/alerts.yml")
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    for a in alerts:
        assert a["expr"].strip() and a["for"], a["alert"]
        assert a["labels"]["severity"] in ("critical", "warning", "info"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
    # every alert has a promtool unit test, and docs/OPERATIONS.md tells what to do about it
    tests = (repo / "deploy/prometheus/alerts.test.yml").read_text()
    ops = (repo / "docs/OPERATIONS.md").read_text()
    for name in names:
        assert f"alertname: {name}" in tests, f"no unit test for {name}"
        assert name in ops, f"{name} is not explained in docs/OPERATIONS.md"


def test_kubernetes_prometheusrule_matches_alerts(repo, yaml_load):
    rules = yaml_load(repo / "deploy/prometheus/alerts.yml")
    pr = yaml_load(repo / "deploy/k8s/base/prometheusrule.yaml")
    assert pr["kind"] == "PrometheusRule"
    assert pr["spec"]["groups"] == rules["groups"], "copy deploy/prometheus/alerts.yml's groups into it"
