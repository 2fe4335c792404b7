"""The model runner: owns the physical KV pool and the per-row tensors, moves bytes.

Rows are batch slots 0..max_rows-1; a sequence (one CFG branch of one image) occupies
one row while it runs. The engine keeps running rows compact at 0..n-1, so a decode
step over the first `bucket` rows has a static shape and can be captured in a CUDA graph.
Padding rows point at the scratch page 0 and are ignored.

Per decode step and layer, `kv.attention.pool_decode` writes each row's new token (over the
victim the previous pass picked, staging the old K/V for the spill) and attends over the row,
picking the next victim in the same pass: one kernel launch per layer on CUDA.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import ResolvedCache
from ..kv.attention import pool_decode, scores_attention
from ..kv.decode_state import DecodeRows, LayerState
from ..kv.policy import policy_mode
from ..kv.pool import KVPool, PoolGeometry, raw, to_kv_storage, zeros
from ..model.llamagen import Transformer, prompt_attention_mask
from .scheduler import SeqAlloc, StepPlan
from .staging import Staging


class StepHook(Protocol):
    """Work that runs right after the model step, inside its CUDA graph (the engine's sampling)."""

    def __call__(self, B: int, key: int) -> None: ...  # rows [:B]; key picks one of its graph variants

    def state(self) -> list[torch.Tensor]: ...  # tensors it changes: restored after a capture's warmup


class RowState:
    """Static per-row buffers (size max_rows); index [:B] for a batch of B rows."""

    def __init__(self, geo: PoolGeometry, max_rows: int, max_pages: int, n_head: int, vocab: int,
                 device: torch.device):
        L, R, Hkv, D = geo.n_layer, max_rows, geo.kv_heads, geo.head_dim
        i32 = dict(dtype=torch.int32, device=device)
        self.block_table = torch.zeros(R, max_pages, **i32)  # page ids; 0 = scratch
        self.n_stored = torch.zeros(R, **i32)  # valid slots before this step's token is written
        self.budget = torch.ones(R, **i32)  # slots the row may hold
        self.prefix = torch.zeros(R, **i32)  # positions < prefix are never evicted
        self.local = torch.ones(R, **i32)  # positions > t - local are never evicted
        self.mode = torch.zeros(R, **i32)  # policy.MODE_*
        self.tokens = torch.zeros(R, dtype=torch.long, device=device)  # token fed this step
        self.positions = torch.zeros(R, dtype=torch.long, device=device)  # its position
        self.vsum = torch.zeros(L, R, Hkv, D, dtype=torch.float32, device=device)  # S per layer/head
        self.victim = torch.full((L, R, Hkv), -1, **i32)  # slot to overwrite next, per layer/head
        # the previous step's softmax log-sum-exp per layer/query head (line's attention score; +inf: none yet)
        self.lse = torch.full((L, R, n_head), float("inf"), dtype=torch.float32, device=device)
        self.logits = torch.zeros(R, vocab, dtype=torch.float32, device=device)
        # spill staging: what this step overwrote, (L, R, Hkv, D) and positions (L, R, Hkv)
        self.spill_k = zeros((L, R, Hkv, D), geo.dtype, device)
        self.spill_v = zeros((L, R, Hkv, D), geo.dtype, device)
        self.spill_pos = torch.zeros(L, R, Hkv, **i32)

    def per_row(self) -> list[tuple[torch.Tensor, int]]:
        """(tensor, row dim) for everything that moves with a row."""
        return [(self.block_table, 0), (self.n_stored, 0), (self.budget, 0), (self.prefix, 0),
                (self.local, 0), (self.mode, 0), (self.tokens, 0), (self.positions, 0),
                (self.vsum, 1), (self.victim, 1), (self.lse, 1)]


class PoolDecodeCache:
    """KVCache for one decode step of rows [:B] (one new token per row): per layer, one
    `pool_decode` call writes the new token (over last step's victim when the row is full)
    and attends, choosing the next victim."""

    def __init__(self, pool: KVPool, rows: RowState, B: int, scale: float):
        self.pool, self.rows, self.B, self.scale = pool, rows, B, scale
        r = rows
        self.step = DecodeRows(r.block_table[:B], r.n_stored[:B], r.budget[:B], r.prefix[:B], r.local[:B],
                               r.mode[:B], r.positions[:B])  # fmt: skip

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r, B, pool = self.rows, self.B, self.pool
        state = LayerState(pool.k[layer], pool.v[layer], pool.pos[layer], pool.stat[layer],
                           r.vsum[layer, :B], r.lse[layer, :B], r.victim[layer, :B],
                           r.spill_k[layer, :B], r.spill_v[layer, :B], r.spill_pos[layer, :B])  # fmt: skip
        return pool_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, self.step, self.scale).unsqueeze(2)


class PoolPrefillCache:
    """KVCache for the condition tokens of newly admitted rows: full attention among them,
    then only the valid (unpadded) tokens are stored, in slots 0..count-1."""

    def __init__(self, pool: KVPool, rows: RowState, row_ids: list[int], valid: torch.Tensor):
        self.pool, self.rows = pool, rows
        n, T = valid.shape
        dev = valid.device
        self.mask = prompt_attention_mask(valid, T)[:, None] if not bool(valid.all()) else None
        P = pool.geo.page_size
        seq_idx, tok_idx = valid.nonzero(as_tuple=True)  # flat list of stored tokens
        counts = valid.sum(1)
        slot = torch.arange(len(seq_idx), device=dev) - (counts.cumsum(0) - counts)[seq_idx]
        row_t = torch.tensor(row_ids, device=dev)
        self.seq_idx, self.tok_idx = seq_idx, tok_idx
        self.row_of = row_t[seq_idx]
        self.page = rows.block_table[self.row_of, slot // P].long()
        self.off = slot % P
        self.row_t, self.counts = row_t, counts.to(torch.int32)
        self.scoring = scores_attention(rows.mode[self.row_of])  # (N,) stored tokens of line rows

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rep = q.shape[1] // k.shape[1]
        kr, vr = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if rep > 1 else (k, v)
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=self.mask, is_causal=self.mask is None)
        kv_dtype = self.pool.k[layer].dtype
        ks = to_kv_storage(k[self.seq_idx, :, self.tok_idx], kv_dtype)  # (N, Hkv, D) stored tokens, as stored
        vs = to_kv_storage(v[self.seq_idx, :, self.tok_idx], kv_dtype)
        inv = 1.0 / vs.float().norm(dim=-1).clamp_min(1e-6)  # (N, Hkv)
        stat = torch.where(self.scoring[:, None], 0.0, inv)  # line rows start every slot's score at 0
        p, o = self.page[:, None], self.off[:, None]
        h = torch.arange(k.shape[1], device=k.device)[None, :]
        raw(self.pool.k[layer])[p, h, o] = raw(ks)
        raw(self.pool.v[layer])[p, h, o] = raw(vs)
        self.pool.pos[layer][p, h, o] = self.tok_idx[:, None].to(torch.int32).expand_as(inv)
        self.pool.stat[layer][p, h, o] = stat
        vsum = torch.zeros(len(self.row_t), *vs.shape[1:], device=vs.device)
        vsum.index_add_(0, self.seq_idx, vs.float() * inv.unsqueeze(-1))
        self.rows.vsum[layer, self.row_t] = vsum
        self.rows.victim[layer, self.row_t] = -1
        return out


class ModelRunner:
    def __init__(self, model: Transformer, geo: PoolGeometry, max_rows: int, max_pages_per_row: int,
                 cuda_graphs: bool = False, compile_step: bool = False):
        self.model = model
        self.cfg = model.config
        self.device = model.device
        self.geo = geo
        self.max_rows = max_rows
        self.pool = KVPool(geo, self.device)
        self.rows = RowState(geo, max_rows, max_pages_per_row, self.cfg.n_head, self.cfg.vocab_size, self.device)
        self.scale = self.cfg.head_dim ** -0.5
        self.staging = Staging(self.device)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        if compile_step:  # fuse norms, RoPE and residuals: a decode step is otherwise launch-bound
            model.compile_blocks()
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b < max_rows] + [max_rows]
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # by (bucket, hook key)
        self._warmup_stream: torch.cuda.Stream | None = None
        self._graph_pool = None

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # --- applying the scheduler's plan: the only writer of block tables and pool tensors -------------
    def apply(self, plan: StepPlan) -> None:
        """Swap-outs are saved before any released row or page is reused; then rows are cleared, moved,
        assigned to admitted requests, and restored for swapped-in ones."""
        for item, allocs, _ in plan.swap_out:
            item.swap_data = [(_to_cpu(self.pool.read_pages(a.pages)), self._save_row(a.row)) for a in allocs]
        for row in plan.cleared_rows:
            self.clear_row(row)
        for src, dst in plan.moves:
            self._move_row(src, dst)
        for item in plan.admitted:
            for a in item.allocs:
                self._assign_row(a, item.cache)
        for item in plan.swapped_in:
            for a, (pages, row_state) in zip(item.allocs, item.swap_data):
                self.pool.write_pages(a.pages, pages)
                self._restore_row(a.row, row_state)
            item.swap_data = None
        # after the restores: a saved block table named the old pages
        self._set_pages([a for item in plan.admitted + plan.swapped_in for a in item.allocs])

    def _set_pages(self, allocs: list[SeqAlloc]) -> None:
        """The block tables of these rows, in two staged copies however many rows (a ring slot per row would
        wrap the staging ring, and wait for the GPU, when a wave of requests is admitted at once)."""
        if not allocs:
            return
        table = torch.zeros(len(allocs), self.rows.block_table.shape[1], dtype=torch.int32)  # 0: scratch page
        for i, a in enumerate(allocs):
            table[i, : len(a.pages)] = torch.tensor(a.pages, dtype=torch.int32)
        rows = self.staging.copy(torch.tensor([a.row for a in allocs]))
        self.rows.block_table.index_copy_(0, rows, self.staging.copy(table))

    def _assign_row(self, a: SeqAlloc, cache: ResolvedCache) -> None:
        r, row = self.rows, a.row
        mode = policy_mode(cache.policy if cache.evicts else "dense")
        # fill_, never `t[row] = value`: that copies the value from pageable memory, which waits for the GPU
        for t, value in ((r.n_stored, 0), (r.budget, cache.budget), (r.prefix, cache.prefix), (r.local, cache.local),
                         (r.mode, mode)):
            t[row].fill_(value)
        r.vsum[:, row].zero_()
        r.victim[:, row].fill_(-1)
        r.lse[:, row].fill_(float("inf"))

    def start_rows(self, rows: list[int], labels: list[int]) -> None:
        """c2i rows begin at position 0 with their class label (the unconditional row: the "no class" label):
        the next decode step embeds it as the condition token, stores it and samples image token 0."""
        for row, label in zip(rows, labels):
            self.rows.tokens[row].fill_(label)
            self.rows.positions[row].fill_(0)

    def clear_row(self, row: int) -> None:
        """Point a row at the scratch page so a padded decode step writes nothing that matters."""
        r = self.rows
        r.block_table[row].zero_()
        r.n_stored[row].fill_(0)
        r.budget[row].fill_(1)
        r.mode[row].fill_(0)

    def _move_row(self, src: int, dst: int) -> None:
        for t, dim in self.rows.per_row():
            t.select(dim, dst).copy_(t.select(dim, src))
        self.clear_row(src)

    def _save_row(self, row: int) -> list[torch.Tensor]:
        return [t.select(dim, row).to("cpu", copy=True) for t, dim in self.rows.per_row()]

    def _restore_row(self, row: int, saved: list[torch.Tensor]) -> None:
        for (t, dim), s in zip(self.rows.per_row(), saved):
            t.select(dim, row).copy_(s)

    # --- compute ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, row_ids: list[int], cond_emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Condition tokens (n, T, dim) of new rows -> logits (n, V) predicting image token 0."""
        T = cond_emb.shape[1]
        cache = PoolPrefillCache(self.pool, self.rows, row_ids, valid)
        logits = self.model.forward_embeddings(cond_emb, torch.arange(T, device=self.device), cache)
        self.rows.n_stored[cache.row_t] = cache.counts
        return logits[:, -1].float()

    def _decode(self, B: int) -> None:
        r = self.rows
        h = self.model.embed_step(r.tokens[:B], r.positions[:B])  # (B, 1, dim)
        cache = PoolDecodeCache(self.pool, r, B, self.scale)
        _, n_slots = cache.step.after_write()
        r.logits[:B] = self.model.forward_embeddings(h, r.positions[:B, None], cache)[:, 0]  # to fp32 in the copy
        r.n_stored[:B] = n_slots

    @torch.no_grad()
    def decode(self, n_rows: int, then: StepHook | None = None, key: int = 0) -> torch.Tensor:
        """One token for rows [:n_rows] (tokens/positions already set), then `then(bucket, key)` (the
        engine's sampling, which feeds the next tokens) in the same CUDA graph, one per (bucket, key):
        pass the same hook on every call. Returns logits (bucket, V)."""
        B = self.bucket_for(n_rows)  # rows n_rows..B-1 were cleared when released: scratch only
        if not self.use_graphs:
            self._step(B, then, key)
        else:
            g = self.graphs.get((B, key))
            if g is None:
                g = self._capture(B, then, key)
            g.replay()
        return self.rows.logits[:B]

    @torch.no_grad()  # as decode: under autograd the compile would trace a backward through the skinny kernel's op
    def capture_all(self, then: StepHook | None = None, key: int = 0) -> int:
        """Capture every bucket's graph for `key` now, so that no step waits mid-serving for a capture (or a
        compile of a new shape). Returns how many were captured."""
        todo = [B for B in self.buckets if (B, key) not in self.graphs] if self.use_graphs else []
        for B in todo:
            self._capture(B, then, key)
        return len(todo)

    def _capture(self, B: int, then: StepHook | None, key: int) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (compiles Triton, allocates workspaces), then capture.
        # Warmed up on scratch rows and with the hook's state saved, so real rows and tokens are untouched
        # (the capture itself runs nothing).
        state = [t for t, _ in self.rows.per_row()] + (then.state() if then is not None else [])
        saved = [t.clone() for t in state]
        for row in range(B):
            self.clear_row(row)
        if self._warmup_stream is None:  # one for every capture: a new stream each time strands cached blocks
            self._warmup_stream = torch.cuda.Stream()
            self._graph_pool = torch.cuda.graph_pool_handle()
        s = self._warmup_stream
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step(B, then, key)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # one memory pool for all graphs: they never run concurrently and write their results into
        # static buffers allocated outside, so one graph's temporaries may reuse another's
        with torch.cuda.graph(g, pool=self._graph_pool):
            self._step(B, then, key)
        for t, s_ in zip(state, saved):
            t.copy_(s_)
        self.graphs[(B, key)] = g
        return g

    def _step(self, B: int, then: StepHook | None, key: int) -> None:
        self._decode(B)
        if then is not None:
            then(B, key)


def _to_cpu(groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[t.to("cpu", copy=True) for t in g] for g in groups]
