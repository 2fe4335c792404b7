"""Fixtures for the HTTP server tests (helpers live in server_fake_engine.py and server_live.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the helper modules beside this file (pytest does not put this folder on sys.path for us)
sys.path.insert(0, str(Path(__file__).parent))

from server_live import API_KEY, LiveServer  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def _live_servers():
    """Both subprocess servers, started together so their (import + load + warm-up) overlap."""
    servers = {
        # the main one: API keys on, default queue, previews every row when streamed; 1,000 classes, so
        # the ImageNet names apply (prompts of the OpenAI route); JSON logs
        "live": LiveServer(
            "live",
            {
                "ADSA_API_KEYS": f"{API_KEY},other-key",
                "ADSA_MAX_BATCH_SIZE": "16",
                "ADSA_PREVIEW_EVERY_ROWS": "1",
                "ADSA_NUM_CLASSES": "1000",
                "ADSA_LOG_FORMAT": "json",
            },
        ),
        # a one-image-at-a-time server with a short queue and an fp8 KV cache: 429s and the SIGTERM drain test
        "small": LiveServer(
            "small",
            {
                "ADSA_MAX_BATCH_SIZE": "1",
                "ADSA_MAX_QUEUE": "4",
                "ADSA_DRAIN_TIMEOUT_S": "60",
                "ADSA_KV_CACHE_DTYPE": "fp8",
            },
        ),
    }
    try:
        for s in servers.values():
            s.wait_ready()
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture(scope="session")
def live_server(_live_servers) -> LiveServer:
    return _live_servers["live"]


@pytest.fixture(scope="session")
def small_server(_live_servers) -> LiveServer:
    return _live_servers["small"]
