"""argparse types for numbers, shared by the CLIs and `loadtest`. Imports nothing heavy: `python -m loadtest`, an
HTTP client, never loads torch."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _finite(text: str, *, zero_ok: bool) -> float:
    """nan passes every comparison and inf makes a wait that never ends: both are refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if zero_ok else '>'} 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _finite(text, zero_ok=False)


def non_negative_float(text: str) -> float:
    return _finite(text, zero_ok=True)
