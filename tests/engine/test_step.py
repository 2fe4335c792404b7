"""The decode step's sampling and feeding: one function (`sample_and_feed`), captured in the decode
CUDA graph on GPU and run eagerly here. Checked: top-k buckets draw what the exact top-k draws, the
padded static batch equals the per-request eager path without touching real state, and the engine's
static inputs follow every change of the batch (so device j always equals the host's n_sampled)."""

from __future__ import annotations

import pytest
import torch

from adsa_core.config import GPTConfig, ResolvedCache
from adsa_core.engine import Finished, GenerationRequest, RequestCancelled, RequestFailed
from adsa_core.engine.request import EngineRequest
from adsa_core.engine.runner import RowState
from adsa_core.engine.sampler import INT_FIELDS, StepBatch, k_max_of, pack, sample_and_feed
from adsa_core.engine.scheduler import SeqAlloc
from adsa_core.kv.pool import PoolGeometry
from adsa_core.sampling import SamplingParams, cfg_combine, k_max_bucket, sample_tokens

from .test_engine import UNSEEN, codes_of, make_engine, run_all, tiny_models

# vocabulary large enough for the top-k buckets 48 and 240 (1008 + margin sorts half of it: full sort)
WIDE = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=1200, block_size=16, num_classes=5)


def settings(B: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    temperature = torch.rand(B, generator=gen) + 0.5
    top_k = torch.randint(1, 300, (B,), generator=gen)
    top_p = torch.rand(B, generator=gen) * 0.5 + 0.5
    top_p[::3] = 1.0
    greedy = torch.zeros(B, dtype=torch.bool)
    greedy[::9] = True
    return temperature, top_k, top_p, greedy


def test_k_max_buckets():
    assert [k_max_bucket(k, 16384) for k in (0, 1, 48, 49, 240, 1000, 2000, 2033, 4080, 4081)] == [
        0, 48, 48, 240, 240, 1008, 2032, 4080, 4080, 0]
    assert k_max_bucket(40, 128) == 0 and k_max_bucket(40, 130) == 48  # sorting half the vocabulary: sort it all


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-ties"])
def test_top_k_buckets_draw_what_the_exact_top_k_draws(bf16):
    """A batch's k_max is rounded up to a bucket (one CUDA graph each): the draw must not change, also
    when logits tie (a bf16 model's logits tie often, and topk leaves the order of ties open)."""
    gen = torch.Generator().manual_seed(7)
    B, V = 96, 16384
    for trial in range(4):
        logits = torch.randn(B, V, generator=gen) * 2
        if bf16:
            logits = logits.bfloat16().float()
        logits[:8, 1:30] = logits[:8, :1]  # 30 exact ties at the top, across the k-th largest
        temperature, top_k, top_p, greedy = settings(B, gen)
        if trial % 2:
            top_k = torch.randint(1, 40, (B,), generator=gen)
        seeds, positions = torch.arange(B) + 1000 * trial, torch.arange(B) % 17
        exact = int(top_k.max())
        ref = sample_tokens(logits, seeds, positions, temperature, top_k, top_p, greedy, exact)
        for k_max in (k_max_bucket(exact, V), 4096, 0):
            got = sample_tokens(logits, seeds, positions, temperature, top_k, top_p, greedy, k_max)
            assert torch.equal(got, ref), k_max


def fake_items(specs: list[dict], n_tokens: int) -> list[EngineRequest]:
    items = []
    cache = ResolvedCache("dense", n_tokens, 1, 1, n_tokens)
    for k, s in enumerate(specs):
        req = GenerationRequest(condition=0, seed=s["seed"], sampling=s["sp"], forced_tokens=s.get("forced"),
                                request_id=str(k))
        it = EngineRequest(priority=0, n_seqs=len(s["rows"]), cache=cache, req=req, slot=s["slot"],
                           n_sampled=s["j"], sink=lambda ev: None, request_id=str(k))
        it.allocs = [SeqAlloc(r, []) for r in s["rows"]]
        items.append(it)
    return items


def eager_step(items: list[EngineRequest], logits: torch.Tensor, codes: torch.Tensor, forced: torch.Tensor,
               rows: RowState, pos_offset: int) -> torch.Tensor:
    """The engine's per-step path before the CUDA graph held it: one request at a time, exact top-k."""
    guided = []
    for it in items:
        sp, j = it.req.sampling, it.n_sampled
        c, u = logits[it.allocs[0].row], logits[it.allocs[-1].row]
        g = cfg_combine(c[None], u[None], sp.cfg_scale)[0] if sp.cfg_active(j) else c
        tok = sample_tokens(g[None], torch.tensor([it.req.seed]), torch.tensor([j]),
                            torch.tensor([sp.temperature]), torch.tensor([sp.top_k]), torch.tensor([sp.top_p]),
                            torch.tensor([sp.greedy]), sp.top_k)[0]
        if it.req.forced_tokens is not None:
            tok = forced[it.slot, j]
        codes[it.slot, j] = tok
        for a in it.allocs:
            rows.tokens[a.row], rows.positions[a.row] = tok, j + pos_offset
        guided.append(g)
        it.n_sampled += 1
    return torch.stack(guided)


def test_padded_static_step_equals_the_per_request_path():
    """Three requests on rows 0..4 of a bucket of 8 (rows 5..7 and items 3..7 are padding), several steps:
    the same tokens, codes, fed rows and guided logits as the per-request path; padding writes only
    the scratch slot and scratch rows."""
    gen = torch.Generator().manual_seed(0)
    V, N, T, max_rows, B, n_rows = 1200, 16, 1, 16, 8, 5
    forced_toks = torch.randint(0, V, (N,), generator=gen)
    specs = [
        dict(rows=[2, 4], slot=3, seed=11, j=0, sp=SamplingParams(cfg_scale=3.0, cfg_interval=1, top_k=20,
                                                                   top_p=0.9)),
        dict(rows=[0], slot=0, seed=12, j=5, sp=SamplingParams(cfg_scale=1.0, top_k=200, temperature=0.7)),
        dict(rows=[1, 3], slot=6, seed=13, j=2, sp=SamplingParams(cfg_scale=4.0, top_k=50), forced=forced_toks),
    ]
    geo = PoolGeometry.for_model(WIDE, 4, 2, torch.float32)
    rows, ref_rows = (RowState(geo, max_rows, 4, geo.kv_heads, V, torch.device("cpu")) for _ in range(2))
    for r in (rows, ref_rows):
        r.tokens.fill_(-1)
        r.positions.fill_(-1)
    n_slots = 8  # slot 7: scratch
    codes, forced = torch.full((n_slots, N), -1), torch.zeros(n_slots, N, dtype=torch.long)
    forced[6] = forced_toks
    ref_codes = codes.clone()
    items, ref_items = fake_items(specs, N), fake_items(specs, N)
    ints, floats = pack(items, max_rows, n_slots - 1, by_row=True)  # scratch slot 7
    k_max = k_max_of(items, V, torch.device("cpu"))
    assert k_max == 240
    guided = torch.zeros(max_rows, V)
    for _ in range(4):
        logits = torch.randn(max_rows, V, generator=gen) * 3
        logits[:, 7:20] = logits[:, 6:7]  # ties
        sample_and_feed(StepBatch.of(ints[:, :B], floats[:, :B]), logits[:B], k_max, codes, forced, rows, T,
                        guided[:B])
        ref_guided = eager_step(ref_items, logits, ref_codes, forced, ref_rows, T)
        assert torch.equal(codes[:n_slots - 1], ref_codes[:n_slots - 1])  # real slots, untouched ones included
        assert torch.equal(rows.tokens[:n_rows], ref_rows.tokens[:n_rows])
        assert torch.equal(rows.positions[:n_rows], ref_rows.positions[:n_rows])
        assert (rows.tokens[B:] == -1).all() and (rows.positions[B:] == -1).all()  # beyond the bucket: untouched
        assert ((rows.positions[n_rows:B] >= T) & (rows.positions[n_rows:B] < T + N)).all()  # scratch rows
        assert torch.equal(guided[:3], ref_guided)
        assert ints[INT_FIELDS.index("j"), :3].tolist() == [it.n_sampled for it in ref_items]  # j advanced in place
    assert (codes[6, 2:6] == forced_toks[2:6]).all()


def test_a_batch_change_mid_run_changes_no_request():
    """Requests join (mixed CFG, cfg_interval, top-k buckets 48 / 240 / full sort) while others run,
    one leaves early: each image equals the one it gets alone."""
    models = tiny_models(WIDE)
    specs = {
        "a": (1, SamplingParams(cfg_scale=4.0, top_k=20)),
        "b": (2, SamplingParams(cfg_scale=1.0, top_k=0, top_p=0.9)),
        "c": (3, SamplingParams(cfg_scale=2.0, cfg_interval=3, top_k=100, temperature=0.8)),
        "d": (4, SamplingParams(cfg_scale=3.0, top_k=60)),
    }

    def req(rid: str) -> GenerationRequest:
        label, sp = specs[rid]
        return GenerationRequest(condition=label, seed=ord(rid), sampling=sp, request_id=rid)

    alone = {rid: codes_of(run_all(make_engine(models), [req(rid)]), rid) for rid in specs}
    eng = make_engine(models)
    events: dict[str, list] = {}
    sink = {rid: (lambda ev, rid=rid: events.setdefault(rid, []).append(ev)) for rid in specs}
    join_at = {0: "a", 3: "b", 5: "c", 9: "d"}
    keys = set()
    for step in range(200):
        if step in join_at:
            eng.submit(req(join_at[step]), sink[join_at[step]])
        if not eng.has_work:
            break
        eng.step()
        keys.add(eng.sampler.k_max)
    eng.close()
    assert keys == {0, 48, 240}  # the batch moved between graph keys
    for rid in specs:
        assert torch.equal(codes_of(events, rid), alone[rid]), rid


def test_static_inputs_follow_every_batch_change():
    """Joins, completions, a CFG interval ending, a swap out and in, a cancellation, a failure: before
    every decode step the static inputs equal a fresh packing of the running batch (j == n_sampled
    included), so the dirty flag misses no change."""
    models = tiny_models(UNSEEN)
    eng = make_engine(models, kv_pool_tokens=5 * 40)  # five sequences at full budget (10 pages of 4 each)
    checked = [0]
    decode = eng._decode
    j = INT_FIELDS.index("j")

    def checked_decode(plan):
        if not plan.batch_changed:
            ints, floats = pack(plan.running, eng.max_rows, eng.sampler.scratch_slot, by_row=True)
            got = eng.sampler.ints.clone()
            got[j, len(plan.running):] = 0  # padding items count their j on from 0
            assert torch.equal(got, ints) and torch.equal(eng.sampler.floats, floats)
            assert eng.sampler.k_max == k_max_of(plan.running, eng.cfg.vocab_size, eng.device)
            checked[0] += 1
        decode(plan)

    def fault(rid: str) -> None:
        if rid == "bad" and eng.requests[rid].n_sampled == 9:
            raise RuntimeError("injected")

    eng._decode, eng.fault_hook = checked_decode, fault
    events: dict[str, list] = {}

    def submit(rid: str, **kw) -> None:
        kw.setdefault("sampling", SamplingParams(cfg_scale=3.0, top_k=10))
        events[rid] = []
        eng.submit(GenerationRequest(condition=len(events) % 7, seed=len(events), request_id=rid, **kw),
                   events[rid].append)

    submit("low")
    submit("interval", sampling=SamplingParams(cfg_scale=3.0, cfg_interval=4))  # drops its second row
    plan = {3: lambda: submit("bad", sampling=SamplingParams(cfg_scale=1.0)),
            6: lambda: submit("cancel", sampling=SamplingParams(cfg_scale=1.0, greedy=True)),
            7: lambda: submit("high", priority=5),  # the pool is full: swaps "cancel" and "bad" out
            30: lambda: eng.cancel("cancel")}
    for step in range(400):
        if step in plan:
            plan[step]()
        if not eng.has_work:
            break
        eng.step()
    eng.close()
    assert isinstance(events["bad"][-1], RequestFailed) and isinstance(events["cancel"][-1], RequestCancelled)
    assert all(isinstance(events[r][-1], Finished) for r in ("low", "interval", "high"))
    assert eng.stats_.swapped_out_total >= 1
    assert checked[0] > 20  # steps on an unchanged batch, each checked
