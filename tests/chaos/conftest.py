"""The chaos suite: fault, slow-client and overload scenarios against the real daemon (tiny model, CPU).
`ADSA_CHAOS_REPORT=<file>` writes the figures of every scenario as the markdown table that
docs/RELIABILITY.md shows."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# the helper modules beside this file and the live-server helper of the server tests
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from chaos_helpers import CHAOS_KEY, READ_TIMEOUT_S, Row  # noqa: E402
from server_live import LiveServer  # noqa: E402


@pytest.fixture(scope="session")
def chaos_rows():
    rows: list[Row] = []
    yield rows
    if path := os.environ.get("ADSA_CHAOS_REPORT"):
        head = ("| scenario | requests | outcomes | 5xx | hangs | API RSS MB before / peak / after |\n"
                "|---|---|---|---|---|---|\n")
        Path(path).write_text(head + "\n".join(r.markdown() for r in rows) + "\n")


@pytest.fixture(scope="module")
def chaos_server():
    """API keys on, two images at a time, four waiting, previews every row, 2 s to send a request."""
    srv = LiveServer("chaos", {"ADSA_API_KEYS": CHAOS_KEY, "ADSA_MAX_BATCH_SIZE": "2", "ADSA_MAX_QUEUE": "4",
                               "ADSA_PREVIEW_EVERY_ROWS": "1", "ADSA_READ_TIMEOUT_S": str(READ_TIMEOUT_S)})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
