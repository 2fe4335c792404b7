"""KV policies: which slot a full sequence overwrites next. A policy is one `KVPolicy`, registered here.

Every policy is the same mechanism with a different victim rule, evaluated by the attention pass
over the pool (`attention.pool_attention`): among a full row's candidate slots, the victim is the one
with the largest key, the lowest slot on ties. Candidates are the valid slots whose position p lies in
[prefix, t - local]: prefix (p < n) and local (p > t - m) slots are never candidates.
  dense   never evicts (its budget is the whole sequence)
  adsa    key = v̂_i·S: the slot whose value vector is most redundant, i.e. has the largest mean cosine
          similarity to the other cached values (S = the sum of normalised values; DESIGN.md section 4)
  window  key = -p: the oldest candidate (StreamingLLM: prefix + recent tokens)
  line    key = -a_i: the slot the recent queries attended to least (LineAR, arXiv 2512.04857: the prefix
          and the last image lines stay whole, the middle lines lose the tokens the current line ignores).
          a_i is an exponential moving average, over the row's decode steps, of the attention each query
          paid to slot i (the softmax probability, summed over the query heads that share the kv head):
          a_i <- LINE_DECAY * a_i + p_i, with a horizon of 1 / (1 - LINE_DECAY) = 10 queries, part of one
          image line of LlamaGen's 16-24-token rows (on the demo, 0.9 is the best or within 3 % of the best
          decay in KL at every budget; 100 queries and the plain sum are 4-90 % worse: docs/FIDELITY.md).
          A new slot starts at 0, and by the time it leaves the local window (>= one line + 1 steps) it has
          been scored by the queries of a whole line. The single
          pass cannot know this step's softmax normaliser before it has seen every slot, so p_i is formed
          with the previous step's log-sum-exp (kept per row and query head): exact up to the ratio of
          two consecutive normalisers, which scales every slot of a step alike and so keeps the ranking
          of one step's contributions (the first step, with no previous normaliser, adds nothing; a p_i
          above 1, possible only when the normaliser jumps, counts as 1).

Each slot carries one fp32 statistic in the pool (`KVPool.stat`): 1/|V| for every policy but those that
score attention (line), for which it is a_i (their 1/|V| is computed from the value where it is needed).

Adding a policy is `register(KVPolicy(...))`: CacheConfig accepts its name, the engine gives its rows
its `mode`, and the torch path ranks candidates by its `victim_key`. The fused Triton kernel implements
the rules of the policies marked `in_kernel` and takes their modes from here; while a registered
policy that evicts has no kernel rule, CUDA decode runs every row on the torch path.

Torch-free on purpose: config.py imports it, and the victim keys only call tensor methods.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# (redundancy, position int32, attention), each (B, Hkv, N) over the row's n slots -> the eviction key (B, Hkv, N).
# redundancy = v̂_i·S / n, about the mean cosine similarity of value i to the row's values (adsa's r_i);
# attention = a_i · n · (1 - LINE_DECAY): 1 for a slot that got a uniform share of the recent queries' attention
# (rows that score attention; elsewhere the slot's 1/|V|, scaled alike, which no such key reads).
VictimKey = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]

LINE_DECAY = 0.9  # per-step decay of the attention score a_i (line): a ~10-query horizon (docs/FIDELITY.md)


@dataclass(frozen=True)
class KVPolicy:
    name: str
    mode: int  # the id a row of this policy carries (DecodeRows.mode) and the kernel compares against
    victim_key: VictimKey | None  # None: never evicts
    in_kernel: bool = False  # the Triton kernel (kv/kernels/pool_attention.py) implements this rule
    scores_attention: bool = False  # the slot statistic is the attention score a_i, not 1/|V|

    @property
    def evicts(self) -> bool:
        return self.victim_key is not None


_REGISTRY: dict[str, KVPolicy] = {}


def register(policy: KVPolicy) -> KVPolicy:
    """Adds a policy; its name and mode must be new (modes are int32 row state, 0..2**31-1)."""
    if policy.name in _REGISTRY:
        raise ValueError(f"KV policy {policy.name!r} is already registered")
    if not 0 <= policy.mode < 2**31:
        raise ValueError(f"KV policy mode {policy.mode} is outside 0..2**31-1")
    taken = next((p.name for p in _REGISTRY.values() if p.mode == policy.mode), None)
    if taken is not None:
        raise ValueError(f"KV policy mode {policy.mode} is already {taken!r}'s")
    if policy.evicts and not policy.in_kernel:
        warnings.warn(
            f"KV policy {policy.name!r} has no Triton kernel rule: CUDA decode uses the torch path "
            "for every row while it is registered",
            stacklevel=2,
        )
    _REGISTRY[policy.name] = policy
    return policy


def unregister(name: str) -> None:
    """Removes a policy added with `register`; the built-in ones stay (the kernel is compiled against them)."""
    if name in BUILT_IN:
        raise ValueError(f"KV policy {name!r} is built in and cannot be removed")
    del _REGISTRY[get_policy(name).name]


def get_policy(name: str) -> KVPolicy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {', '.join(policy_names())}") from None


def policy_names() -> tuple[str, ...]:
    """Registered policy names, in registration order (dense, adsa, window, line first)."""
    return tuple(_REGISTRY)


def policy_mode(name: str) -> int:
    return get_policy(name).mode


def evicting_policies() -> tuple[KVPolicy, ...]:
    return tuple(p for p in _REGISTRY.values() if p.evicts)


def attention_modes() -> tuple[int, ...]:
    """Modes whose rows keep the attention score a_i in the slot statistic."""
    return tuple(p.mode for p in _REGISTRY.values() if p.scores_attention)


def kernel_covers_registry() -> bool:
    """Whether the Triton kernel implements every registered policy that evicts (else CUDA decode takes the torch
    path; a row of a policy that never evicts runs in dense's mode)."""
    return all(p.in_kernel for p in evicting_policies())


DENSE = register(KVPolicy("dense", 0, None, in_kernel=True))
ADSA = register(KVPolicy("adsa", 1, lambda redundancy, position, attention: redundancy, in_kernel=True))
WINDOW = register(KVPolicy("window", 2, lambda redundancy, position, attention: -position.float(), in_kernel=True))
LINE = register(KVPolicy("line", 3, lambda redundancy, position, attention: -attention, in_kernel=True,
                         scores_attention=True))
BUILT_IN = policy_names()
