"""docs/OPERATIONS.md: the paths it points at exist, and the capacity table awaits the benchmark."""

from __future__ import annotations

import re


def test_paths_in_operations_exist(repo):
    text = (repo / "docs/OPERATIONS.md").read_text()
    paths = set(re.findall(r"`((?:deploy|docs|loadtest|tests)/[\w./-]+|Dockerfile|\.dockerignore)`", text))
    assert len(paths) >= 10
    user_made = {"deploy/.env"}  # the operator creates it
    missing = [p for p in paths - user_made if not (repo / p.rstrip("/")).exists()]
    assert not missing, missing


def test_capacity_table_is_marked(repo):
    text = (repo / "docs/OPERATIONS.md").read_text()
    start, end = text.index("<!-- CAPACITY TABLE"), text.index("<!-- END CAPACITY TABLE -->")
    table = [ln for ln in text[start:end].splitlines() if ln.startswith("|")]
    assert "images/s at saturation" in table[0] and len(table) >= 4


def test_sections(repo):
    text = (repo / "docs/OPERATIONS.md").read_text()
    for heading in (
        "## One GPU host: docker compose",
        "## A multi-GPU host",
        "## Kubernetes",
        "## Draining and rolling updates",
        "## Alerts and what to do",
        "## Reading the dashboard",
        "## Capacity planning",
    ):
        assert heading in text, heading
