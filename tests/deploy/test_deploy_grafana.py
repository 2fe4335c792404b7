"""The provisioned Grafana dashboard and datasource: JSON parses, layout is sane, generator in sync."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest


@pytest.fixture(scope="module")
def dashboard(repo):
    return json.loads((repo / "deploy/grafana/dashboards/adsa-serve.json").read_text())


def test_dashboard_is_generated_from_make_dashboard(repo):
    spec = importlib.util.spec_from_file_location("make_dashboard", repo / "deploy/grafana/make_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    committed = (repo / "deploy/grafana/dashboards/adsa-serve.json").read_text()
    assert committed == mod.render(), "stale dashboard JSON: run python deploy/grafana/make_dashboard.py"


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] == "adsa-serve" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"{p['title']}: unknown variable ${var}"
            assert 'instance=~"$instance"' in t["expr"], f"{p['title']}: not filtered by $instance"


def test_dashboard_has_the_panels_operators_need(dashboard):
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for words in (
        "images/s",
        "tokens/s",
        "queue depth",
        "running",
        "latency p50 / p90 / p99",
        "kv cache usage",
        "evictions",
        "spilled",
        "gpu memory",
        "decode step",
        "batch size",
    ):
        assert words in titles, words


def test_provisioning(repo, yaml_load):
    ds = yaml_load(repo / "deploy/grafana/provisioning/datasources/prometheus.yml")
    assert ds["apiVersion"] == 1
    (prom,) = ds["datasources"]
    assert (
        prom["type"] == "prometheus"
        and prom["uid"] == "prometheus"
        and prom["url"] == "http://prometheus:9090"
    )
    dash = yaml_load(repo / "deploy/grafana/provisioning/dashboards/adsa-serve.yml")
    (provider,) = dash["providers"]
    assert provider["type"] == "file"
    # the compose file mounts deploy/grafana/dashboards at the provider's path
    compose = yaml_load(repo / "deploy/compose.yaml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
