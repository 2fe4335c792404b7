"""Shared fixtures of the deployment tests: repo paths, YAML loading, and the server's metric list."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

# Every metric family adsa-serve exports, name -> type, from the interface contract (DESIGN.md
# section 7 and server/metrics.py). Counters carry their _total suffix; histograms are named by
# family (their _bucket/_sum/_count samples are accepted). The dashboard, the alert rules and the
# autoscaler queries may use only these (checked in test_deploy_metrics.py).
# TODO(issue 6): replace this constant by a live scrape of the real server's /metrics (start
# `adsa-serve` on 127.0.0.1 with the demo model and parse it with loadtest.promtext).
SERVER_METRICS: dict[str, str] = {
    "adsa_requests_total": "counter",
    "adsa_images_generated_total": "counter",
    "adsa_image_decode_chunks_total": "counter",
    "adsa_tokens_generated_total": "counter",
    "adsa_num_requests_running": "gauge",
    "adsa_num_requests_waiting": "gauge",
    "adsa_kv_cache_usage_ratio": "gauge",
    "adsa_kv_cache_capacity_tokens": "gauge",
    "adsa_kv_evictions_total": "counter",
    "adsa_kv_spilled_bytes_total": "counter",
    "adsa_gpu_memory_allocated_bytes": "gauge",
    "adsa_gpu_memory_reserved_bytes": "gauge",
    "adsa_gpu_memory_peak_bytes": "gauge",
    "adsa_gpu_memory_used_bytes": "gauge",
    "adsa_gpu_memory_total_bytes": "gauge",
    "adsa_request_latency_seconds": "histogram",
    "adsa_queue_time_seconds": "histogram",
    "adsa_time_to_first_preview_seconds": "histogram",
    "adsa_decode_step_seconds": "histogram",
    "adsa_batch_size": "histogram",
    "adsa_http_requests_total": "counter",
    "adsa_http_request_duration_seconds": "histogram",
}


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def server_metrics() -> dict[str, str]:
    """Metric families of the server, name -> type (see SERVER_METRICS)."""
    return SERVER_METRICS


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads compose's merge-control tags (!reset, !override) as plain values."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _tagged)


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.load(f, Loader=_ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_all(path: Path) -> list:
    with path.open() as f:
        return [d for d in yaml.load_all(f, Loader=_ComposeLoader) if d is not None]  # noqa: S506


@pytest.fixture(scope="session")
def yaml_load():
    """load_yaml(path): YAML with compose's !reset/!override tags accepted."""
    return load_yaml


@pytest.fixture(scope="session")
def yaml_load_all():
    return load_yaml_all
