"""What one decode step hands the attention over the pool: the rows and one layer's tensors.

A leaf module (torch only), shared by the torch oracle (`kv.attention`) and the Triton kernel
(`kv.kernels.pool_attention`) so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeRows:
    """Per-row state of the B rows of a decode step (all (B,) int32 unless noted)."""

    block_table: torch.Tensor  # (B, max_pages) page ids; 0 = scratch
    n_stored: torch.Tensor  # valid slots before this step's token is written
    budget: torch.Tensor  # slots the row may hold
    prefix: torch.Tensor  # positions < prefix are never evicted
    local: torch.Tensor  # positions > position - local are never evicted
    mode: torch.Tensor  # the row's KV policy: KVPolicy.mode (kv.policy)
    position: torch.Tensor  # (B,) int64: position of this step's token

    def after_write(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, n_slots): whether the step overwrites a victim, and valid slots after the write."""
        return self.n_stored >= self.budget, torch.minimum(self.n_stored + 1, self.budget)


@dataclass
class LayerState:
    """One layer's pool tensors (P, Hkv, page, ...) and its per-row policy state for B rows.
    stat (line rows), vsum, lse and victim are read and updated in place; spill_* receive what this
    step overwrote."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    stat: torch.Tensor  # (P, Hkv, page) fp32: 1/|V|, or the attention score a_i of line rows (kv.policy)
    vsum: torch.Tensor  # (B, Hkv, D) fp32: S = sum of the row's unit values
    lse: torch.Tensor  # (B, H) fp32: the previous step's softmax log-sum-exp per query head (+inf: none yet)
    victim: torch.Tensor  # (B, Hkv) int32: slot to overwrite next, -1 = none
    spill_k: torch.Tensor  # (B, Hkv, D)
    spill_v: torch.Tensor  # (B, Hkv, D)
    spill_pos: torch.Tensor  # (B, Hkv) int32
