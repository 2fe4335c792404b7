"""Pinned CPU memory for evicted K/V: one contiguous block per decode step.

Each step, the K, V and position of every slot that step overwrote (for the sequences
still under their spill limit) are gathered on the device into one contiguous tensor (a few
small kernels) and copied to the arena with a single asynchronous copy on a side stream, so
spilling never waits for the host. Blocks live in a ring and are
reclaimed once every sequence that owns rows in them has ended; when the ring is full
the step is not spilled (counted in `dropped_steps` / `dropped_bytes`), never stalling decode.

Production never reads the arena back: evicted K/V is kept in pinned CPU memory (DESIGN.md) and
accounted per request (`SpillRecord.bytes`); the tests read the ring's bytes directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SpillBlock:
    start: int  # element offset in the arena
    rows: int  # sequences stored in this block
    refs: int  # sequences that have not ended yet
    event: torch.cuda.Event | None = None


@dataclass
class SpillRecord:
    """Where one sequence's spilled steps live: (block, row within the block) per step."""

    entries: list[tuple[SpillBlock, int]] = field(default_factory=list)
    bytes: int = 0


class SpillArena:
    def __init__(self, capacity_bytes: int, n_layer: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.device = device
        elem = torch.tensor([], dtype=dtype).element_size()
        # per spilled (sequence, step): K and V (L, H, D) plus int32 positions (L, H) stored as raw bytes
        self.kv_elems = 2 * n_layer * kv_heads * head_dim
        self.step_bytes = self.kv_elems * elem + n_layer * kv_heads * 4
        self.capacity = max(0, capacity_bytes // self.step_bytes)  # in (sequence, step) units
        pin = device.type == "cuda" and self.capacity > 0
        self.kv = torch.empty(self.capacity, self.kv_elems * elem, dtype=torch.uint8, pin_memory=pin)  # as bytes
        self.pos = torch.empty(self.capacity, n_layer * kv_heads, dtype=torch.int32, pin_memory=pin)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.blocks: list[SpillBlock] = []  # ring order, oldest first
        self.head = 0  # next free unit
        self._dropped_steps = 0
        self._dropped_bytes = 0

    @property
    def dropped_steps(self) -> int:
        """Steps not spilled because the ring was full (a monotonic counter, as a metric exports it)."""
        return self._dropped_steps

    @property
    def dropped_bytes(self) -> int:
        """K/V and position bytes those steps would have spilled (monotonic)."""
        return self._dropped_bytes

    def _reclaim(self) -> None:
        while self.blocks and self.blocks[0].refs == 0:
            self.blocks.pop(0)

    def _allocate(self, rows: int) -> int | None:
        """Start of `rows` contiguous free units, or None when the ring is full."""
        self._reclaim()
        tail = self.blocks[0].start if self.blocks else None
        if tail is None:
            self.head = 0
            return 0 if rows <= self.capacity else None
        if self.head > tail:  # free space is [head, capacity) and [0, tail)
            if self.head + rows <= self.capacity:
                return self.head
            return 0 if rows <= tail else None
        if self.head == tail:  # live blocks reach all the way round to the oldest: full, not empty
            return None
        return self.head if self.head + rows <= tail else None

    def store(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor,
              owners: list[SpillRecord]) -> bool:
        """k, v: (L, R, H, D) and pos: (L, R, H) staging on the device; row idx[i] (idx on the device too)
        belongs to owners[i]. One gather per tensor, of whole (layer, row) slices as wide words."""
        n = len(owners)
        if n == 0:
            return True
        start = self._allocate(n)
        if start is None:
            self._dropped_steps += 1
            self._dropped_bytes += n * self.step_bytes
            return False
        # indexing, not index_select: for <= 16 spilled rows in a step index_select runs a kernel with one thread
        # per word of a row that loops over the rows (16 us a gather at batch 8, run 22); indexing is one per word
        # (the stack adds one small copy: still 0.04 ms a step less at batch 8, run 23)
        kv = torch.stack((_words(k)[idx], _words(v)[idx]), dim=1)  # rows: K then V, each (L, H, D)
        kv = kv.view(n, -1).view(torch.uint8)
        p = _words(pos)[idx].reshape(n, -1).view(torch.int32)  # (n, L*H)
        block = SpillBlock(start, n, n)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.kv[start: start + n].copy_(kv, non_blocking=True)
                self.pos[start: start + n].copy_(p, non_blocking=True)
                block.event = torch.cuda.Event()
                block.event.record(self.stream)
            kv.record_stream(self.stream)
            p.record_stream(self.stream)
        else:
            self.kv[start: start + n].copy_(kv)
            self.pos[start: start + n].copy_(p)
        self.blocks.append(block)
        self.head = start + n
        for i, rec in enumerate(owners):
            rec.entries.append((block, i))
            rec.bytes += self.step_bytes
        return True

    def release(self, rec: SpillRecord) -> None:
        for block, _ in rec.entries:
            block.refs -= 1
        rec.entries.clear()


def _words(t: torch.Tensor) -> torch.Tensor:
    """(L, R, ...) contiguous -> a (R, L, W) view of each (row, layer) slice as W of the widest words that divide it
    (8 bytes for GPT-XL's 20 x 64 fp8 or bf16 slices, single bytes at worst): gathers move words, not bytes."""
    b = t.view(torch.uint8).flatten(2)
    w = next(w for w in (torch.int64, torch.int32, torch.int16, torch.uint8) if b.shape[-1] % w.itemsize == 0)
    return b.view(w).transpose(0, 1)
