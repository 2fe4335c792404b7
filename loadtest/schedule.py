"""Arrival schedules for open-loop load.

An open-loop generator sends request i at its scheduled time whatever happened to the earlier
ones, so a slow server cannot slow the client down (no coordinated omission). Poisson arrivals
(exponential gaps) are the usual model of many independent users.
"""

from __future__ import annotations

import random


def poisson_arrivals(rate: float, max_requests: int, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival offsets in seconds from the stage start, for a Poisson process of `rate` per second.

    Bounded both ways: at most `max_requests` arrivals, and none at or after `duration_s`.
    Offsets are strictly increasing.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if max_requests < 0:
        raise ValueError(f"max_requests must be >= 0, got {max_requests}")
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    out: list[float] = []
    t = 0.0
    while len(out) < max_requests:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        out.append(t)
    return out


def uniform_arrivals(rate: float, max_requests: int, duration_s: float) -> list[float]:
    """Evenly spaced arrivals (a deterministic baseline), with the same bounds as `poisson_arrivals`."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    gap = 1.0 / rate
    out: list[float] = []
    i = 1
    while len(out) < max_requests and i * gap < duration_s:
        out.append(i * gap)
        i += 1
    return out
