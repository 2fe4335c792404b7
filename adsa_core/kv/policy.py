"""KV policies: which slot a full sequence overwrites next.

Every policy is the same mechanism with a different victim rule, evaluated by the
attention pass over the pool (see `attention.pool_attention`):
  dense   budget = whole sequence, never evicts
  adsa    evict the "previous"-region slot whose value vector is most redundant,
          i.e. has the largest mean cosine similarity to the other cached values
          (argmax of v_i/|v_i| . S with S the sum of normalised values; DESIGN.md section 4)
  window  evict the oldest previous-region slot (StreamingLLM: prefix + recent tokens)
Prefix (p < n) and local (p > t - m) slots are never candidates.
"""

from __future__ import annotations

MODE_NONE = 0
MODE_ADSA = 1
MODE_WINDOW = 2

POLICY_MODE = {"dense": MODE_NONE, "adsa": MODE_ADSA, "window": MODE_WINDOW}


def candidate_range(position: int, prefix: int, local: int) -> tuple[int, int]:
    """Positions that may be evicted when the token at `position` arrives: [prefix, position - local]."""
    return prefix, position - local
