"""How long decode steps take on the device, not on the host.

A decode step on the GPU is one CUDA-graph replay: the host only enqueues it (well under a
millisecond) and runs ahead, so host wall time says nothing about the step. CUDA events recorded
around each step's decode give the device's time for it (`device_s`) and the time between the ends
of consecutive steps (`period_s`); period > device means the GPU waited for the host between steps.
Events are read only once they completed (`query()`), so the clock never blocks the engine loop.
On the CPU steps are synchronous: both are the host's wall time.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepTiming:
    device_s: float  # the decode step's own time on the device (model step + sampling)
    period_s: float  # end of the previous step to the end of this one (0 for the first after idle)
    rows: int  # sequences in the step


class StepClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event, int]] = deque()
        self._last_end: torch.cuda.Event | None = None
        self._last_host_end = 0.0

    def start(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def end(self, start: torch.cuda.Event | float, rows: int) -> list[StepTiming]:
        """Record the step's end; returns the timings of every step that completed since the last call."""
        if isinstance(start, float):
            now = time.perf_counter()
            period = now - self._last_host_end if self._last_host_end else 0.0
            self._last_host_end = now
            return [StepTiming(now - start, period, rows)]
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((start, end, rows))
        done = []
        while self._pending and self._pending[0][1].query():
            s, e, n = self._pending.popleft()
            period = self._last_end.elapsed_time(e) / 1e3 if self._last_end is not None else 0.0
            done.append(StepTiming(s.elapsed_time(e) / 1e3, period, n))
            self._last_end = e
        return done

    def reset(self) -> None:
        """The engine went idle (or a step failed): the next period must not include the pause."""
        self._pending.clear()
        self._last_end = None
        self._last_host_end = 0.0
