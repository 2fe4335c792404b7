"""Helpers of the chaos suite: the server's settings, and the figures each scenario records (requests,
outcomes by status, 5xx, hangs, the API process's RSS before, at its peak and after)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CHAOS_KEY = "chaos-key"
AUTH = {"Authorization": f"Bearer {CHAOS_KEY}"}
READ_TIMEOUT_S = 2.0


def rss_mb(pid: int) -> float:
    """The resident memory of a process in MB (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Row:
    scenario: str
    outcomes: Counter = field(default_factory=Counter)
    hangs: int = 0
    rss: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def markdown(self) -> str:
        n = sum(self.outcomes.values())
        by = ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))
        fivexx = sum(v for k, v in self.outcomes.items() if str(k).startswith("5"))
        before, peak, after = self.rss
        return f"| {self.scenario} | {n} | {by} | {fivexx} | {self.hangs} | {before:.0f} / {peak:.0f} / {after:.0f} |"


class Scenario:
    """Records one scenario's outcomes while sampling the server's RSS (MB) every 20 ms."""

    def __init__(self, rows: list[Row], pid: int, name: str):
        self.row, self.pid = Row(name), pid
        rows.append(self.row)
        self._stop = threading.Event()

    def __enter__(self) -> Scenario:
        self.before = self.peak = rss_mb(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def count(self, outcome: object) -> None:
        self.row.outcomes[str(outcome)] += 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        time.sleep(0.5)  # closed connections and finished requests are let go
        self.row.rss = (self.before, self.peak, rss_mb(self.pid))


