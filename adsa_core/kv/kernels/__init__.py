"""Triton kernels for the KV pool. Import the kernel modules only when HAS_TRITON is true:
CPU machines (CI) have no Triton, and the torch paths in adsa_core.kv are used there."""

from __future__ import annotations

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only install
    HAS_TRITON = False
