"""Admission, swapping and row placement: plain Python over row, page and slot ids.

The scheduler never touches tensors. Each engine step it returns a `StepPlan` (vLLM v1's
SchedulerOutput): which requests were swapped out, which rows were released, how running rows
move to stay compact, who is admitted where, and the decode batch. The runner applies the plan
to the physical pool; nothing else writes block tables or pool tensors.

Rows: a sequence (one CFG branch of one image) occupies one row while it runs; running rows are
kept at 0..n-1 so that a decode step over the first `bucket` rows has a static shape.
Slots: each running request's row of the sampler's token buffers. A swap-out gives the slot back with the rows
and pages (the engine keeps its tokens), so that a higher priority can take every kind of room it needs.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from ..config import ResolvedCache
from ..kv.pool import PageAllocator, pages_for


@dataclass
class SeqAlloc:
    """One sequence's resources: a batch row and its KV pages."""

    row: int  # batch row of the runner's per-row tensors
    pages: list[int]  # KV pool pages, in slot order


@dataclass(eq=False)
class Schedulable:
    """What the scheduler knows about a request (the engine's request record extends it)."""

    priority: int  # higher runs first and may swap lower-priority requests out
    n_seqs: int  # 2 with CFG (conditional + unconditional), else 1; 1 after the CFG branch is freed
    cache: ResolvedCache  # policy, budget (slots per sequence), prefix and local window
    order: int = 0  # arrival order (FIFO tiebreak)
    allocs: list[SeqAlloc] = field(default_factory=list)  # while running: one per sequence
    slot: int = -1  # row of the sampler's token buffers while it runs (-1 waiting, swapped out too)
    swapped: bool = False  # waiting after a swap-out: its saved state must be restored, not prefilled
    swap_data: Any = None  # the runner's CPU copy of the rows and pages while swapped out
    swap_tokens: Any = None  # the engine's CPU copy of its slot's token buffers while swapped out


@dataclass
class StepPlan:
    """What the runner applies before a decode step, in field order: reads of old places come first."""

    swap_out: list[tuple[Schedulable, list[SeqAlloc], int]]  # save these (old) rows, pages and slot to CPU first
    cleared_rows: list[int]  # rows released since the last plan: point them at the scratch page
    moves: list[tuple[int, int]]  # (src, dst) row moves that keep running rows at 0..n-1
    admitted: list[Schedulable]  # new requests with fresh rows and pages: assign, then prefill
    swapped_in: list[Schedulable]  # swapped-out requests back on fresh rows and pages: restore
    running: list[Schedulable]  # the decode batch, every request with rows, in admission order
    n_rows: int  # rows [:n_rows] hold running sequences
    batch_changed: bool  # anything above changed the batch: the sampler refills its static inputs


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_rows: int, n_slots: int, page_size: int, max_queue: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_queue = max_queue
        self.max_rows = max_rows
        self.n_slots = n_slots
        self._free_rows = list(range(max_rows - 1, -1, -1))  # popped from the end: lowest first
        self._free_slots = list(range(n_slots - 1, -1, -1))
        self._waiting: list[tuple[int, int, Schedulable]] = []  # heap of (-priority, order, item)
        self._counter = itertools.count()
        self.running: list[Schedulable] = []
        self._cleared: list[int] = []  # rows released since the last plan
        self._changed = True  # the batch changed since the last plan

    # --- queue ---------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def changed(self) -> bool:
        """Rows were released since the last plan (the next plan clears and compacts them)."""
        return self._changed

    @property
    def queue_room(self) -> int:
        """Images that may still be queued: max_queue waiting, beyond those the batch's free slots will
        take at the next plan (a burst into an idle engine of capacity max_batch + max_queue fits)."""
        return self.max_queue + len(self._free_slots) - len(self._waiting)

    @property
    def queue_capacity(self) -> int:
        """queue_room of an idle engine: the most images one submission can ever queue."""
        return self.max_queue + self.n_slots

    def pages_needed(self, n_seqs: int, budget: int) -> int:
        return n_seqs * pages_for(budget, self.page_size)

    def fits_ever(self, n_seqs: int, budget: int) -> bool:
        """Whether a request could run in an otherwise empty engine (constant facts only)."""
        return self.pages_needed(n_seqs, budget) <= self.allocator.num_usable and n_seqs <= self.max_rows

    def enqueue(self, item: Schedulable) -> None:
        """New work (the caller checked queue_room) or swapped-out work re-entering."""
        if not item.swapped:
            item.order = next(self._counter)
        heapq.heappush(self._waiting, (-item.priority, item.order, item))

    # --- releases (between plans) --------------------------------------------------------------
    def release(self, item: Schedulable, seq_index: int | None = None) -> None:
        """Free all of a request's resources (it ended), or one sequence of a running one (CFG over)."""
        if seq_index is not None:
            self._release_rows([item.allocs.pop(seq_index)])
            item.n_seqs = len(item.allocs)
            return
        if item.allocs:
            self._release_rows(item.allocs)
            item.allocs = []
            self.running.remove(item)
        else:
            self._remove_waiting(item)
        if item.slot >= 0:
            self._free_slots.append(item.slot)
            item.slot = -1

    def _release_rows(self, allocs: list[SeqAlloc]) -> None:
        for a in allocs:
            self.allocator.free(a.pages)
            self._free_rows.append(a.row)
            self._cleared.append(a.row)
        self._changed = True

    def _remove_waiting(self, item: Schedulable) -> None:
        self._waiting = [w for w in self._waiting if w[2] is not item]
        heapq.heapify(self._waiting)

    # --- the plan ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        swap_out = self._swap_out_for_head()
        moves = self._compact()
        admitted, swapped_in = [], []
        while self._waiting and self._can_allocate(self._waiting[0][2]):
            _, _, item = heapq.heappop(self._waiting)
            self._allocate(item)
            (swapped_in if item.swapped else admitted).append(item)
            item.swapped = False
        changed = self._changed or bool(admitted or swapped_in or moves)
        plan = StepPlan(swap_out, self._cleared, moves, admitted, swapped_in, list(self.running),
                        sum(len(it.allocs) for it in self.running), changed)
        self._cleared, self._changed = [], False
        return plan

    def _can_allocate(self, item: Schedulable) -> bool:
        # a slot too (waiting requests hold none): rows alone may be free while every slot is held (a request that
        # released its CFG row)
        return (self.pages_needed(item.n_seqs, item.cache.budget) <= self.allocator.num_free
                and item.n_seqs <= len(self._free_rows) and bool(self._free_slots))

    def _allocate(self, item: Schedulable) -> None:
        self._free_rows.sort(reverse=True)  # compact rows: the lowest free rows first
        per_seq = pages_for(item.cache.budget, self.page_size)
        item.allocs = [SeqAlloc(self._free_rows.pop(), self.allocator.allocate(per_seq)) for _ in range(item.n_seqs)]
        item.slot = self._free_slots.pop()
        self.running.append(item)

    def _compact(self) -> list[tuple[int, int]]:
        """Move running rows into the holes below n (n = running rows) so rows 0..n-1 are all live."""
        allocs = sorted((a for it in self.running for a in it.allocs), key=lambda a: a.row)
        n = len(allocs)
        holes = sorted(r for r in self._free_rows if r < n)
        moves = []
        for hole, a in zip(holes, [a for a in allocs if a.row >= n]):
            moves.append((a.row, hole))
            self._free_rows.remove(hole)
            self._free_rows.append(a.row)
            a.row = hole
        return moves

    def _swap_out_for_head(self) -> list[tuple[Schedulable, list[SeqAlloc], int]]:
        """If the head of the queue does not fit, release the lowest-priority, latest running requests
        whose pages, rows and slots let it in (only strictly lower priorities), and requeue them."""
        if not self._waiting or self._can_allocate(head := self._waiting[0][2]):
            return []
        pages, rows = self.allocator.num_free, len(self._free_rows)  # slots: any victim gives one back
        chosen: list[Schedulable] = []
        for item in sorted(self.running, key=lambda it: (it.priority, -it.order)):
            if item.priority >= head.priority:
                return []
            chosen.append(item)
            pages += sum(len(a.pages) for a in item.allocs)
            rows += len(item.allocs)
            if pages >= self.pages_needed(head.n_seqs, head.cache.budget) and rows >= head.n_seqs:
                break
        else:
            return []
        out = []
        for item in chosen:
            out.append((item, item.allocs, item.slot))
            self._release_rows(item.allocs)
            self.running.remove(item)
            self._free_slots.append(item.slot)
            item.allocs, item.slot = [], -1
            item.swapped = True
            self.enqueue(item)
        return out
