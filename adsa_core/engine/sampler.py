"""The sampling batch: per-request sampling inputs packed into static device buffers, and the
function that turns one step's logits into the next tokens.

`sample_and_feed` runs right after the model step, inside the decode step's CUDA graph: CFG,
temperature, top-k/top-p and the draw, then it writes each request's token into its codes row and feeds
it to the request's rows (on CUDA one Triton kernel does all but the feeding; torch ops elsewhere). The
inputs are `StepBatch` fields, packed on the host with numpy only when the batch changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from ..kv.kernels import HAS_TRITON
from ..sampling import SamplingParams, cfg_combine, k_max_bucket, sample_tokens
from .runner import RowState
from .staging import Staging


class StepBatch(NamedTuple):
    """Inputs of one sampling step: views of two packed tensors, ints (len(INT_FIELDS), W) and floats
    (len(FLOAT_FIELDS), W). Item k (a request, or padding) has the per-item fields; row r (a sequence) has
    `row` and `owner`."""

    cond: torch.Tensor  # (W,) logits row of item k's conditional sequence
    uncond: torch.Tensor  # (W,) and of its unconditional one (== cond without CFG)
    seed: torch.Tensor
    j: torch.Tensor  # image tokens sampled so far: the index of the one sampled now (advanced in place)
    cfg_interval: torch.Tensor
    top_k: torch.Tensor
    greedy: torch.Tensor  # 0/1
    forced: torch.Tensor  # 0/1: take forced[slot, j] instead of a sample
    slot: torch.Tensor  # row of the engine's codes/forced
    row: torch.Tensor  # (W,) a runner row to feed
    owner: torch.Tensor  # (W,) the item whose token that row is fed
    cfg_scale: torch.Tensor  # floats from here
    temperature: torch.Tensor
    top_p: torch.Tensor

    @classmethod
    def of(cls, ints: torch.Tensor, floats: torch.Tensor) -> StepBatch:
        return cls(*ints.unbind(0), *floats.unbind(0))


FLOAT_FIELDS = ("cfg_scale", "temperature", "top_p")
ROW_FIELDS = ("row", "owner")
ITEM_INT_FIELDS = tuple(f for f in StepBatch._fields if f not in FLOAT_FIELDS + ROW_FIELDS)
INT_FIELDS = ITEM_INT_FIELDS + ROW_FIELDS
assert StepBatch._fields == INT_FIELDS + FLOAT_FIELDS  # StepBatch.of splits the two tensors in this order
# a padding item: greedy (no top-k work), no CFG, writing its token into the scratch slot (set per batch)
PADDING = dict(cond=0, uncond=0, seed=0, j=0, cfg_interval=-1, top_k=1, greedy=1, forced=0, cfg_scale=0.0,
               temperature=1.0, top_p=1.0)


class SampledItem(Protocol):
    """What packing reads of a request."""

    seed: int
    sampling: SamplingParams
    n_sampled: int  # image tokens sampled so far
    slot: int
    has_forced: bool
    rows: Sequence[int]  # its sequences' runner rows, the conditional one first


def pack(items: Sequence[SampledItem], width: int, scratch_slot: int, by_row: bool
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Host tensors (len(INT_FIELDS), width) int64 and (len(FLOAT_FIELDS), width) fp32 of StepBatch fields for
    `items`, padded to `width` items that write to the scratch slot, and to `width` rows with rows
    n_rows..width-1 (the scratch rows of a compact batch) fed by the first padding item.
    by_row: logits are indexed by runner row (decode), else by sequence in the order of items (prefill).
    Built with numpy: this runs on every batch change, and torch.tensor(list) is 4x slower."""
    n = len(items)
    rows_of = [it.rows for it in items]  # read once: properties may build them
    sampling = [it.sampling for it in items]
    first = np.cumsum([0] + [len(r) for r in rows_of])  # each item's first sequence, in item order
    values = {
        "cond": [r[0] for r in rows_of] if by_row else first[:-1],
        "uncond": [r[-1] for r in rows_of] if by_row else first[1:] - 1,
        "seed": [it.seed for it in items], "j": [it.n_sampled for it in items],
        "forced": [it.has_forced for it in items], "slot": [it.slot for it in items],
        **{f: [getattr(sp, f) for sp in sampling]
           for f in ("cfg_interval", "top_k", "greedy", "cfg_scale", "temperature", "top_p")},
    }
    pad = {**PADDING, "slot": scratch_slot}
    ints = np.empty((len(INT_FIELDS), width), dtype=np.int64)
    floats = np.empty((len(FLOAT_FIELDS), width), dtype=np.float32)
    for out, names in ((ints, ITEM_INT_FIELDS), (floats, FLOAT_FIELDS)):
        for i, name in enumerate(names):
            out[i, :n] = values[name]
            out[i, n:] = pad[name]
    k = int(first[-1])
    r_i, o_i = INT_FIELDS.index("row"), INT_FIELDS.index("owner")
    ints[r_i, :k] = [r for rows in rows_of for r in rows]
    ints[r_i, k:] = np.arange(k, width)
    ints[o_i, :k] = np.repeat(np.arange(n), np.diff(first))
    ints[o_i, k:] = n
    return torch.from_numpy(ints), torch.from_numpy(floats)


def uses_sampling_kernel(device: torch.device) -> bool:
    """Sampling runs as one Triton kernel (adsa_core.sampling_kernel) on CUDA, else as torch ops."""
    return device.type == "cuda" and HAS_TRITON


def k_max_of(items: Sequence[SampledItem], vocab: int, device: torch.device) -> int:
    """The batch's top-k bucket (host int): topk over this many logits instead of sorting them all (the
    torch sampler; the Triton one needs no bucket, so one graph per batch bucket serves every batch)."""
    if uses_sampling_kernel(device):
        return 0
    top_k = [it.sampling.top_k for it in items]
    return k_max_bucket(max(top_k) if min(top_k) > 0 else 0, vocab)


def sample_and_feed(b: StepBatch, logits: torch.Tensor, k_max: int, codes: torch.Tensor, forced: torch.Tensor,
                    rows: RowState, pos_offset: int, guided: torch.Tensor) -> None:
    """Image token j of every item of `b`, from its rows' logits (R, V): CFG-guided while its interval lasts,
    sampled (or forced), written to codes[slot, j] and fed to its rows for the next decode step; then j += 1.
    guided (W, V) receives the guided logits. Static shapes, no host sync: the decode CUDA graph captures it.
    On CUDA one Triton launch does all of an item's work; only the feeding of its rows (a scatter) stays here."""
    if uses_sampling_kernel(logits.device):
        from ..sampling_kernel import sample_and_feed_triton

        tok, pos, _ = sample_and_feed_triton(logits, b, codes, forced, pos_offset, guided)
        rows.tokens[b.row] = tok[b.owner]
        rows.positions[b.row] = pos[b.owner]
        return
    jc = b.j.clamp_max(codes.shape[1] - 1)  # an index: padding items (and capture warm-ups) count on past the end
    active = (b.cfg_scale > 1.0) & ((b.cfg_interval < 0) | (b.j <= b.cfg_interval + 1))
    cond, uncond = logits[b.cond], logits[b.uncond]  # (W, V)
    torch.where(active.view(-1, 1), cfg_combine(cond, uncond, b.cfg_scale), cond, out=guided)
    tok = sample_tokens(guided, b.seed, b.j, b.temperature, b.top_k, b.top_p, b.greedy.bool(), k_max)
    tok = torch.where(b.forced.bool(), forced[b.slot, jc], tok)
    codes[b.slot, jc] = tok
    # both rows of a request get the same token, at position T_cond + j
    rows.tokens[b.row] = tok[b.owner]
    rows.positions[b.row] = jc[b.owner] + pos_offset
    b.j.add_(1)


class Sampler:
    """Per-request token buffers (`codes`, `forced`; one slot per request plus a scratch slot) and the running
    batch's step inputs in static device buffers of width max_rows (a step of bucket B reads [:, :B]), refilled
    only when the batch changes. The runner calls it after the model step, inside its CUDA graph (one per bucket
    and top-k bucket): it samples and feeds one token per request."""

    def __init__(self, n_slots: int, max_rows: int, vocab: int, block_size: int, rows: RowState, pos_offset: int,
                 staging: Staging):
        self.scratch_slot = n_slots  # padding items of a decode step write their tokens here
        device = staging.device
        self.codes = torch.zeros(n_slots + 1, block_size, dtype=torch.long, device=device)
        self.forced = torch.zeros(n_slots + 1, block_size, dtype=torch.long, device=device)
        self.ints = torch.zeros(len(INT_FIELDS), max_rows, dtype=torch.long, device=device)
        self.floats = torch.zeros(len(FLOAT_FIELDS), max_rows, device=device)
        self.guided = torch.zeros(max_rows, vocab, device=device)  # (item, V): the last step's guided logits
        self.rows, self.pos_offset, self.vocab, self.device = rows, pos_offset, vocab, device
        self.max_rows = max_rows
        self.k_max = 0  # top-k bucket of the batch: the graph key
        self.want: tuple[torch.Tensor, list[int]] | None = None  # items that keep log-probs (device, host)
        self.staging = staging  # the runner's: one ring for every host-to-device copy of a step

    def __call__(self, B: int, k_max: int) -> None:
        b = StepBatch.of(self.ints[:, :B], self.floats[:, :B])
        sample_and_feed(b, self.rows.logits[:B], k_max, self.codes, self.forced, self.rows, self.pos_offset,
                        self.guided[:B])

    def state(self) -> list[torch.Tensor]:
        return [self.ints, self.codes]

    def load(self, items: Sequence[SampledItem], want: list[int]) -> None:
        """Refill the decode step's static inputs for a new batch: the only host-to-device copies of a step.
        j restarts from each request's host count n_sampled, which the step advances in step with j."""
        ints, floats = pack(items, self.max_rows, self.scratch_slot, by_row=True)
        self.staging.copy(ints, self.ints)
        self.staging.copy(floats, self.floats)
        self.k_max = k_max_of(items, self.vocab, self.device)
        self.want = (self.staging.copy(torch.tensor(want)), want) if want else None

    def first_tokens(self, items: Sequence[SampledItem], logits: torch.Tensor, want: list[int]
                     ) -> list[tuple[int, torch.Tensor]]:
        """Token 0 of newly prefilled requests, eagerly, from prefill logits (n_rows, V) in sequence order.
        Returns (item index, log-probs (V,)) of the `want` items."""
        ints, floats = pack(items, len(logits), self.scratch_slot, by_row=False)
        b = StepBatch.of(self.staging.copy(ints), self.staging.copy(floats))
        guided = torch.empty_like(logits)  # (n_rows, V): items padded to the rows' count
        sample_and_feed(b, logits, k_max_of(items, self.vocab, self.device), self.codes, self.forced, self.rows,
                        self.pos_offset, guided)
        return log_softmax_of(guided, self.staging.copy(torch.tensor(want)), want) if want else []

    def logprobs(self) -> list[tuple[int, torch.Tensor]]:
        """(item index, log-probs (V,)) of the last decode step's `want` items."""
        return log_softmax_of(self.guided, *self.want) if self.want is not None else []


def log_softmax_of(guided: torch.Tensor, idx: torch.Tensor, want: list[int]) -> list[tuple[int, torch.Tensor]]:
    logprobs = torch.log_softmax(guided[idx], dim=-1)  # one batched log-softmax, not one per request
    return list(zip(want, logprobs))
