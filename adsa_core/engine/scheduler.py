"""Admission and swapping decisions: plain Python over row ids and page ids.

The scheduler never touches tensors. It decides which waiting request is admitted
(FIFO within a priority level, never over-committing the KV pool), and which running
request is swapped out to CPU when higher-priority work waits and the pool is full.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from ..kv.pool import PageAllocator, pages_for


@dataclass
class SeqAlloc:
    """One sequence's resources: a batch row and its KV pages."""

    row: int
    pages: list[int]


@dataclass(eq=False)
class Schedulable:
    """What the scheduler needs to know about a request."""

    priority: int
    n_seqs: int  # 2 with CFG (conditional + unconditional), else 1
    budget: int  # slots per sequence
    order: int = 0  # arrival order (FIFO tiebreak)
    allocs: list[SeqAlloc] = field(default_factory=list)
    swapped: bool = False


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_rows: int, page_size: int, max_queue: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_queue = max_queue
        self.max_rows = max_rows
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self._waiting: list[tuple[int, int, Schedulable]] = []  # heap of (-priority, order, item)
        self._counter = itertools.count()
        self.running: list[Schedulable] = []

    # --- queue ---------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def pages_needed(self, item: Schedulable) -> int:
        return item.n_seqs * pages_for(item.budget, self.page_size)

    def fits_ever(self, item: Schedulable) -> bool:
        """Whether the item could run in an otherwise empty engine (constant facts only)."""
        return self.pages_needed(item) <= self.allocator.num_usable and item.n_seqs <= self.max_rows

    def enqueue(self, item: Schedulable, *, requeue: bool = False) -> bool:
        """False when the queue is full (new work only; swapped-out work always re-enters)."""
        if not requeue and len(self._waiting) >= self.max_queue:
            return False
        if not requeue:
            item.order = next(self._counter)
        heapq.heappush(self._waiting, (-item.priority, item.order, item))
        return True

    def remove_waiting(self, item: Schedulable) -> bool:
        for i, (_, _, it) in enumerate(self._waiting):
            if it is item:
                self._waiting.pop(i)
                heapq.heapify(self._waiting)
                return True
        return False

    # --- decisions -----------------------------------------------------------------------------
    def _can_allocate(self, item: Schedulable) -> bool:
        return self.pages_needed(item) <= self.allocator.num_free and item.n_seqs <= len(self.free_rows)

    def _allocate(self, item: Schedulable) -> None:
        per_seq = pages_for(item.budget, self.page_size)
        item.allocs = [SeqAlloc(self.free_rows.pop(), self.allocator.allocate(per_seq)) for _ in range(item.n_seqs)]
        self.running.append(item)

    def release(self, item: Schedulable, seq_index: int | None = None) -> list[SeqAlloc]:
        """Free all (or one) of a running item's sequences; returns what was freed."""
        freed = item.allocs if seq_index is None else [item.allocs[seq_index]]
        for a in freed:
            self.allocator.free(a.pages)
            self.free_rows.append(a.row)
        if seq_index is None:
            item.allocs = []
            if item in self.running:
                self.running.remove(item)
        else:
            item.allocs = [a for i, a in enumerate(item.allocs) if i != seq_index]
        return freed

    def schedule(self) -> tuple[list[Schedulable], list[Schedulable]]:
        """Returns (admitted, to_swap_out). Admitted items have allocations; swap-outs must be
        saved by the caller and then `release`d and requeued before their resources are reused,
        so this only proposes swaps and admits nothing while a swap is pending."""
        admitted: list[Schedulable] = []
        while self._waiting:
            _, _, head = self._waiting[0]
            if self._can_allocate(head):
                heapq.heappop(self._waiting)
                self._allocate(head)
                admitted.append(head)
                continue
            victims = self._swap_candidates(head)
            return admitted, victims
        return admitted, []

    def _swap_candidates(self, head: Schedulable) -> list[Schedulable]:
        """Lowest-priority, latest running items whose resources would let `head` in."""
        pages = self.allocator.num_free
        rows = len(self.free_rows)
        chosen = []
        for item in sorted(self.running, key=lambda it: (it.priority, -it.order)):
            if item.priority >= head.priority:
                break
            chosen.append(item)
            pages += sum(len(a.pages) for a in item.allocs)
            rows += len(item.allocs)
            if pages >= self.pages_needed(head) and rows >= head.n_seqs:
                return chosen
        return []
