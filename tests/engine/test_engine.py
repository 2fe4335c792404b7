"""Engine behaviour on CPU: exactness against the reference sampler, ADSA bookkeeping
checked against naive recomputation, and the serving guarantees (isolation, cancellation,
swap, queue limits, deadlines, batch invariance)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adsa_core.config import CacheConfig, EngineConfig, GPTConfig
from adsa_core.engine import (
    DeadlineExceeded,
    Engine,
    EngineError,
    Finished,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    RequestCancelled,
    RequestFailed,
)
from adsa_core.kv.attention import gather_slots
from adsa_core.kv.policy import KVPolicy, register, unregister
from adsa_core.loading import LoadedModels
from adsa_core.model import load_gpt
from adsa_core.reference import generate
from adsa_core.sampling import SamplingParams

DATA = Path(__file__).resolve().parents[1] / "data" / "llamagen"


def tiny_models(cfg: GPTConfig | None = None, ckpt: Path | None = None, seed: int = 0) -> LoadedModels:
    if cfg is None:
        manifest = json.loads((DATA / "MANIFEST.json").read_text())
        cfg = GPTConfig.from_dict(manifest["c2i_gpt.pt"]["config"])
        ckpt = DATA / "c2i_gpt.pt"
    torch.manual_seed(seed)
    gpt = load_gpt(cfg, ckpt)
    return LoadedModels("tiny", gpt, None, cfg, None, cfg.grid_size * 16, torch.device("cpu"), torch.float32)


# an "unseen" model: other shapes than the shared vectors (GQA, 6x6 grid, head_dim 16)
UNSEEN = GPTConfig(dim=96, n_layer=3, n_head=6, n_kv_head=3, vocab_size=50, block_size=36, num_classes=7)


def run_all(engine: Engine, reqs: list[GenerationRequest]) -> dict[str, list]:
    events: dict[str, list] = {}
    for r in reqs:
        engine.submit(r, lambda ev, rid=r.request_id: events.setdefault(rid, []).append(ev))
    while engine.has_work:
        engine.step()
    engine.close()  # waits for image decoding, so every Finished has been delivered
    return events


def codes_of(events: dict[str, list], rid: str) -> torch.Tensor:
    last = events[rid][-1]
    assert isinstance(last, Finished), last
    return last.codes


def make_engine(models, policy="dense", budget=None, **kw) -> Engine:
    cache = CacheConfig(policy=policy, budget=budget, local=kw.pop("local", None), prefix=kw.pop("prefix", None))
    return Engine(models, EngineConfig(max_batch_size=kw.pop("max_batch_size", 8), page_size=kw.pop("page_size", 4),
                                       default_cache=cache, **kw))


@pytest.mark.parametrize("scale,key", [(4.0, "greedy_cfg4"), (1.0, "greedy_cfg1")])
@pytest.mark.parametrize("policy", ["dense", "adsa", "window"])
def test_full_budget_reproduces_shared_greedy_vectors(scale, key, policy):
    io = torch.load(DATA / "c2i_io.pt")
    eng = make_engine(tiny_models(), policy, None if policy == "dense" else 1.0)
    reqs = [GenerationRequest(condition=int(c), seed=i, sampling=SamplingParams(cfg_scale=scale, greedy=True),
                              request_id=str(i)) for i, c in enumerate(io["labels"])]
    ev = run_all(eng, reqs)
    got = torch.stack([codes_of(ev, str(i)) for i in range(len(reqs))])
    assert torch.equal(got, io[key].long())
    assert all(codes_of(ev, r.request_id) is not None and ev[r.request_id][-1].stats.evictions == 0 for r in reqs)


def test_text_model_reproduces_shared_vector():
    manifest = json.loads((DATA / "MANIFEST.json").read_text())
    cfg = GPTConfig.from_dict(manifest["t2i_gpt.pt"]["config"])
    io = torch.load(DATA / "t2i_io.pt")
    eng = make_engine(tiny_models(cfg, DATA / "t2i_gpt.pt"))
    reqs = [GenerationRequest(condition=io["caption"][i], emb_mask=io["emb_masks"][i], seed=i, request_id=str(i),
                              sampling=SamplingParams(cfg_scale=7.5, greedy=True)) for i in range(2)]
    ev = run_all(eng, reqs)
    assert torch.equal(torch.stack([codes_of(ev, "0"), codes_of(ev, "1")]), io["greedy_cfg7_5"].long())


@pytest.mark.parametrize("policy,budget", [("dense", None), ("adsa", 1.0)])
def test_unseen_model_sampled_matches_reference(policy, budget):
    models = tiny_models(UNSEEN)
    params = SamplingParams(cfg_scale=3.0, cfg_interval=20, temperature=0.9, top_k=20, top_p=0.95)
    labels = torch.tensor([0, 3, 6, 2])
    seeds = torch.tensor([11, 12, 13, 14])
    ref = generate(models.gpt, labels, params, seeds=seeds)
    eng = make_engine(models, policy, budget)
    reqs = [GenerationRequest(condition=int(c), seed=int(s), sampling=params, request_id=str(i))
            for i, (c, s) in enumerate(zip(labels, seeds))]
    ev = run_all(eng, reqs)
    assert torch.equal(torch.stack([codes_of(ev, str(i)) for i in range(4)]), ref)


def test_half_budget_bounds_peak_and_pool_bytes():
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=4.0, greedy=True)
    dense = run_all(make_engine(models), [GenerationRequest(condition=1, seed=0, sampling=sp, request_id="d")])
    half = run_all(make_engine(models, "adsa", 0.5, local=7),
                   [GenerationRequest(condition=1, seed=0, sampling=sp, request_id="h")])
    d, h = dense["d"][-1].stats, half["h"][-1].stats
    assert h.kv_budget_tokens == round(0.5 * UNSEEN.seq_len)
    assert h.peak_kv_tokens <= h.kv_budget_tokens and d.peak_kv_tokens == UNSEEN.seq_len
    assert 0.4 <= h.kv_bytes / d.kv_bytes <= 0.6
    assert h.evictions > 0 and h.spilled_bytes > 0


def naive_mean_cosine(v: torch.Tensor) -> torch.Tensor:
    """v: (N, D) -> r_i = mean_{j != i} cos(v_i, v_j), computed pairwise, O(N^2)."""
    u = F.normalize(v.double(), dim=-1)
    sim = u @ u.T
    return (sim.sum(1) - sim.diagonal()) / (len(v) - 1)


@pytest.fixture
def newest_policy():
    """A toy policy that evicts the newest candidate, registered for one test: config, engine and oracle see it."""
    with pytest.warns(UserWarning, match="no Triton kernel rule"):
        register(KVPolicy("newest", 9, lambda redundancy, position, attention: position.float()))
    yield
    unregister("newest")


@pytest.mark.parametrize("policy", ["adsa", "window", "line", "newest"])
def test_victims_spill_and_protected_regions_step_by_step(policy, newest_policy):
    models = tiny_models(UNSEEN, seed=1)
    prefix, local = 3, 7
    eng = make_engine(models, policy, 16, prefix=prefix, local=local, spill_limit_bytes=1 << 30)
    run = eng.runner
    rows, pool = run.rows, run.pool
    events: dict = {}
    for i in range(3):
        eng.submit(GenerationRequest(condition=i, seed=i, request_id=str(i),
                                     sampling=SamplingParams(cfg_scale=2.0, temperature=1.0)),
                   lambda ev, i=i: events.setdefault(i, []).append(ev))
    checked_victims = checked_spills = 0
    lhd = (UNSEEN.n_layer, UNSEEN.kv_heads, UNSEEN.head_dim)
    while eng.has_work:
        n_rows = sum(len(it.allocs) for it in eng.scheduler.running)
        before_k = [k.clone() for k in pool.k]
        before_v = [v.clone() for v in pool.v]
        full = (rows.n_stored[:n_rows] >= rows.budget[:n_rows]).clone()
        victims = rows.victim[:, :n_rows].clone()
        pos_now = rows.positions[:n_rows].clone()
        tables = rows.block_table[:n_rows].clone()  # a finishing row is cleared by the step
        records = {a.row: it.spill[i] for it in eng.scheduler.running for i, a in enumerate(it.allocs)}
        eng.step()
        if not n_rows:
            continue
        for r in range(n_rows):
            if not full[r]:
                continue
            for layer in range(UNSEEN.n_layer):
                for h in range(UNSEEN.kv_heads):
                    slot = int(victims[layer, r, h])
                    page = int(tables[r, slot // 4])
                    off = slot % 4
                    # spilled K/V are byte-for-byte what was overwritten
                    assert torch.equal(rows.spill_k[layer, r, h], before_k[layer][page, h, off])
                    assert torch.equal(rows.spill_v[layer, r, h], before_v[layer][page, h, off])
                    p = int(rows.spill_pos[layer, r, h])
                    t = int(pos_now[r])
                    assert prefix <= p <= t - local, "a prefix or local token was evicted"
                    if records[r].entries:  # and the arena holds exactly that (released once finished)
                        block, i = records[r].entries[-1]  # this step's ring unit: K then V (L, H, D) as bytes
                        unit = block.start + i
                        k_s, v_s = eng.spill.kv[unit].view(torch.float32).view(2, *lhd)
                        assert torch.equal(k_s[layer, h], before_k[layer][page, h, off])
                        assert torch.equal(v_s[layer, h], before_v[layer][page, h, off])
                        assert int(eng.spill.pos[unit].view(lhd[:2])[layer, h]) == p
                        checked_spills += 1
        # the victim chosen for the next step equals a naive recomputation on the current cache
        for r in range(n_rows):
            n = int(rows.n_stored[r])
            if n < int(rows.budget[r]):
                continue
            t_next = int(rows.positions[r])  # already advanced to the next token's position
            for layer in range(UNSEEN.n_layer):
                v = gather_slots(pool.v[layer], rows.block_table[r: r + 1])[0, :, :n].float()  # (Hkv, n, D)
                pos = gather_slots(pool.pos[layer], rows.block_table[r: r + 1])[0, :, :n]
                score = gather_slots(pool.stat[layer], rows.block_table[r: r + 1])[0, :, :n].double()
                for h in range(UNSEEN.kv_heads):
                    cand = (pos[h] >= prefix) & (pos[h] <= t_next - local)
                    if policy == "adsa":
                        key = naive_mean_cosine(v[h])
                    elif policy == "line":  # the least attended (the scores: test_pool_attention.py)
                        key = -score[h]
                    else:  # window: the oldest first; newest: the newest first
                        key = pos[h].double() * (-1 if policy == "window" else 1)
                    key[~cand] = float("-inf")
                    got = int(rows.victim[layer, r, h])
                    if got < 0:
                        assert not cand.any()
                        continue
                    assert cand[got]
                    assert key[got] >= key.max() - 1e-6
                    checked_victims += 1
    eng.close()
    assert checked_victims > 50 and checked_spills > 50
    assert all(isinstance(events[i][-1], Finished) for i in range(3))
    # spill areas hold what the staging buffer held (counted in bytes)
    assert all(events[i][-1].stats.spilled_bytes > 0 for i in range(3))


def test_batch_invariance_same_seed_alone_or_in_batch():
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=4.0, temperature=1.0, top_k=30)
    alone = run_all(make_engine(models, "adsa", 0.6, local=7),
                    [GenerationRequest(condition=2, seed=99, sampling=sp, request_id="x")])
    crowd = [GenerationRequest(condition=i % 7, seed=1000 + i, sampling=sp, request_id=f"n{i}") for i in range(7)]
    batched = run_all(make_engine(models, "adsa", 0.6, local=7),
                      crowd[:3] + [GenerationRequest(condition=2, seed=99, sampling=sp, request_id="x")] + crowd[3:])
    assert torch.equal(codes_of(alone, "x"), codes_of(batched, "x"))


def test_mixed_policies_and_budgets_share_a_batch():
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=4.0, greedy=True)
    solo = {}
    specs = [("dense", None), ("adsa", 0.5), ("window", 0.5), ("adsa", 0.75), ("line", 0.5)]
    reqs = []
    for i, (pol, bud) in enumerate(specs):
        cache = CacheConfig(policy=pol, budget=bud, local=7)
        solo[i] = codes_of(run_all(make_engine(models), [GenerationRequest(
            condition=i, seed=i, sampling=sp, cache=cache, request_id="s")]), "s")
        reqs.append(GenerationRequest(condition=i, seed=i, sampling=sp, cache=cache, request_id=str(i)))
    ev = run_all(make_engine(models), reqs)
    for i in range(len(specs)):
        assert torch.equal(codes_of(ev, str(i)), solo[i])


def test_cancellation_frees_pages():
    models = tiny_models(UNSEEN)
    eng = make_engine(models, "adsa", 0.5, local=7)
    free0 = eng.scheduler.allocator.num_free
    events = []
    eng.submit(GenerationRequest(condition=1, seed=0, request_id="c"), events.append)
    for _ in range(3):
        eng.step()
    assert eng.scheduler.allocator.num_free < free0
    eng.cancel("c")
    eng.step()
    assert eng.scheduler.allocator.num_free == free0 and not eng.has_work
    assert isinstance(events[-1], RequestCancelled)


@pytest.mark.parametrize("policy,budget", [("dense", None), ("line", 0.5)])
def test_swap_out_and_in_gives_the_same_output(policy, budget):
    """A swapped-out request resumes with its pages and row state (line: slot scores and normalisers) intact."""
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=4.0, temperature=1.0)
    # room for exactly one CFG request at its budget: higher priority must swap the other out
    slots = UNSEEN.seq_len if budget is None else round(budget * UNSEEN.seq_len)
    eng = make_engine(models, policy, budget, kv_pool_tokens=2 * 4 * -(-slots // 4))  # 2 sequences, pages of 4
    low = GenerationRequest(condition=1, seed=5, sampling=sp, priority=0, request_id="low")
    high = GenerationRequest(condition=2, seed=6, sampling=sp, priority=1, request_id="high")
    events: dict = {}
    eng.submit(low, lambda ev: events.setdefault("low", []).append(ev))
    for _ in range(10):
        eng.step()
    eng.submit(high, lambda ev: events.setdefault("high", []).append(ev))
    while eng.has_work:
        eng.step()
    eng.close()
    assert events["low"][-1].stats.swapped_out == 1
    for rid, req in (("low", low), ("high", high)):
        if policy == "dense":
            ref = generate(models.gpt, torch.tensor([req.condition]), sp, seeds=torch.tensor([req.seed]))[0]
        else:  # the same request alone, never swapped
            ref = codes_of(run_all(make_engine(models, policy, budget), [req]), rid)
        assert torch.equal(codes_of(events, rid), ref)


def test_a_higher_priority_takes_the_image_slot_of_the_request_it_swaps_out():
    """Image slots, not pages, run out here (max batch 2, a pool for more): the high-priority request swaps the latest
    low one out and takes its slot. That one's tokens, sampled and forced, come back with it. (The slot stayed with
    the swapped-out request before: nothing ran, and the high one waited forever.)"""
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=1.0, temperature=1.0)
    forced = torch.randint(0, UNSEEN.vocab_size, (2, UNSEEN.block_size), generator=torch.Generator().manual_seed(0))
    low = [GenerationRequest(condition=0, seed=0, sampling=sp, request_id="low0"),
           GenerationRequest(condition=1, seed=1, sampling=sp, request_id="low1", forced_tokens=forced[0])]
    high = GenerationRequest(condition=3, seed=3, sampling=sp, priority=1, request_id="high", forced_tokens=forced[1])
    eng = make_engine(models, max_batch_size=2)
    events: dict = {}
    for r in low:
        eng.submit(r, lambda ev, rid=r.request_id: events.setdefault(rid, []).append(ev))
    for _ in range(3):
        eng.step()
    eng.submit(high, lambda ev: events.setdefault("high", []).append(ev))
    for _ in range(4 * UNSEEN.block_size):
        if not eng.has_work:
            break
        eng.step()
    assert not eng.has_work, "stalled: nothing runs while requests wait"
    eng.close()
    assert [events[rid][-1].stats.swapped_out for rid in ("low0", "low1", "high")] == [0, 1, 0]
    assert torch.equal(codes_of(events, "low1"), forced[0]) and torch.equal(codes_of(events, "high"), forced[1])
    assert torch.equal(codes_of(events, "low0"), codes_of(run_all(make_engine(models), [low[0]]), "low0"))
    sched = eng.scheduler
    assert len(sched._free_slots) == 2 and sched.allocator.num_free == sched.allocator.num_usable  # nothing leaked


def test_a_step_that_fails_while_swapping_out_fails_that_request_not_the_next_batch(monkeypatch):
    """Saving a swapped-out request's rows raises (the CPU copy): the step fails, and with it the batch it planned
    (the high-priority request just admitted) and the request being swapped out, whose state is lost. The next
    request runs, and no later step fails. (The swapped-out request stayed queued without its state and failed the
    batch it was swapped back into.)"""
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=1.0, temperature=1.0)
    eng = make_engine(models, max_batch_size=1)
    events: dict = {}
    sink = lambda rid: lambda ev: events.setdefault(rid, []).append(ev)  # noqa: E731
    eng.submit(GenerationRequest(condition=0, seed=0, sampling=sp, request_id="low"), sink("low"))
    for _ in range(3):
        eng.step()
    eng.submit(GenerationRequest(condition=1, seed=1, sampling=sp, priority=1, request_id="high"), sink("high"))

    def broken(row):
        raise RuntimeError("injected: no CPU memory for the swap")

    monkeypatch.setattr(eng.runner, "_save_row", broken)
    with pytest.raises(RuntimeError, match="injected"):
        eng.step()
    assert sorted(eng.fail_running()) == ["high", "low"]  # what the engine core does after a failed step
    monkeypatch.undo()
    after = GenerationRequest(condition=2, seed=2, sampling=sp, request_id="after")
    eng.submit(after, sink("after"))
    while eng.has_work:
        eng.step()  # raises if a later step fails
    eng.close()
    assert all(isinstance(events[rid][-1], RequestFailed) for rid in ("low", "high"))
    assert torch.equal(codes_of(events, "after"), codes_of(run_all(make_engine(models), [after]), "after"))
    assert eng.scheduler.allocator.num_free == eng.scheduler.allocator.num_usable


def test_full_queue_refuses_and_changes_nothing():
    """Capacity is max_queue waiting plus the batch's free slots: a burst of 2 + 2 into an idle engine fits
    (the first two start at the next step, they do not wait); one more is refused and counted."""
    eng = make_engine(tiny_models(UNSEEN), max_queue=2, max_batch_size=2)
    for i in range(4):
        eng.submit(GenerationRequest(condition=i, seed=i, request_id=str(i)), lambda ev: None)
    with pytest.raises(QueueFull):
        eng.submit(GenerationRequest(condition=4, seed=4, request_id="4"), lambda ev: None)
    assert sorted(eng.requests) == ["0", "1", "2", "3"] and eng.scheduler.num_waiting == 4
    assert eng.stats().requests_total_by_status == {"rejected": 1}
    eng.step()  # two run, two wait: the queue is full again
    assert len(eng.scheduler.running) == 2 and eng.scheduler.num_waiting == 2
    with pytest.raises(QueueFull, match=r"^2 images are waiting and this request adds 1 \(room for 0\)$"):
        eng.submit(GenerationRequest(condition=4, seed=4, request_id="4"), lambda ev: None)
    eng = make_engine(tiny_models(UNSEEN), max_queue=1, max_batch_size=1)
    for i in range(2):
        eng.submit(GenerationRequest(condition=i, seed=i, request_id=str(i)), lambda ev: None)
    eng.step()
    with pytest.raises(QueueFull, match=r"^1 image is waiting and this request adds 2 \(room for 0\)$"):
        eng.submit_all([GenerationRequest(condition=i, seed=i, request_id=f"x{i}") for i in range(2)],
                       [lambda ev: None] * 2)


def test_a_submission_no_queue_could_ever_hold_is_invalid_not_full():
    """More images in one submission than an idle engine queues (max_queue + max_batch) would be refused
    however long the client waited: an InvalidRequest (HTTP 422/400), not a QueueFull whose 429 invites a retry."""
    eng = make_engine(tiny_models(UNSEEN), max_queue=2, max_batch_size=2)
    reqs = [GenerationRequest(condition=i, seed=i, request_id=str(i)) for i in range(5)]
    with pytest.raises(InvalidRequest, match="5 images in one request: this server queues at most 4") as e:
        eng.submit_all(reqs, [lambda ev: None] * 5)
    assert e.value.field == "n_images"
    assert not eng.requests and eng.scheduler.num_waiting == 0
    assert eng.stats().requests_total_by_status == {"invalid": 5}
    assert eng.submit_all(reqs[:4], [lambda ev: None] * 4) == ["0", "1", "2", "3"]  # the most that fits does


@pytest.mark.parametrize("bad, field", [
    (dict(condition=7), "condition"), (dict(condition=-1), "condition"), (dict(condition=True), "condition"),
    (dict(condition=1, cache=CacheConfig(policy="adsa", budget=5, local=7)), "cache"),
    (dict(condition=1, forced_tokens=torch.zeros(3, dtype=torch.long)), "forced_tokens"),
    (dict(condition=1, forced_tokens=torch.full((UNSEEN.block_size,), UNSEEN.vocab_size)), "forced_tokens"),
    (dict(condition=1, forced_tokens=torch.full((UNSEEN.block_size,), -1)), "forced_tokens"),
    (dict(condition=1, forced_tokens=torch.zeros(UNSEEN.block_size)), "forced_tokens"),  # floats
    (dict(condition=1, seed=-1), "seed"),
])
def test_invalid_requests_are_refused(bad, field):
    """Refused, nothing kept, and the refusal names the field at fault (the server turns it into `param`)."""
    eng = make_engine(tiny_models(UNSEEN), max_batch_size=2, kv_pool_tokens=4 * UNSEEN.seq_len)
    with pytest.raises(InvalidRequest) as e:
        eng.submit(GenerationRequest(**{"seed": 0, **bad}), lambda ev: None)
    assert e.value.field == field
    assert not eng.requests


def test_guidance_without_a_null_class_is_refused_as_a_sampling_error():
    """A checkpoint trained without label dropout has no 'no class' row: CFG cannot run, and the refusal says the
    sampling settings are at fault (the server names cfg_scale)."""
    eng = make_engine(tiny_models(dataclasses.replace(UNSEEN, class_dropout_prob=0.0)), max_batch_size=2)
    with pytest.raises(InvalidRequest, match="no 'no class' embedding") as e:
        eng.submit(GenerationRequest(condition=1, seed=0, sampling=SamplingParams(cfg_scale=4.0)), lambda ev: None)
    assert e.value.field == "sampling" and not eng.requests
    eng.submit(GenerationRequest(condition=1, seed=0, sampling=SamplingParams(cfg_scale=1.0)), lambda ev: None)


def test_a_request_larger_than_the_pool_is_refused():
    eng = make_engine(tiny_models(UNSEEN), kv_pool_tokens=UNSEEN.seq_len)  # one sequence, CFG needs two
    with pytest.raises(InvalidRequest, match="does not fit") as e:
        eng.submit(GenerationRequest(condition=1, seed=0, sampling=SamplingParams(cfg_scale=4.0)), lambda ev: None)
    assert e.value.field == "cache"
    eng.submit(GenerationRequest(condition=1, seed=0, sampling=SamplingParams(cfg_scale=1.0)), lambda ev: None)


def test_a_failing_request_fails_alone():
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=4.0, greedy=True)
    eng = make_engine(models)

    def fault(rid: str) -> None:
        if rid == "bad":
            raise RuntimeError("injected decode fault")

    eng.fault_hook = fault
    ev = run_all(eng, [GenerationRequest(condition=i, seed=i, sampling=sp, request_id=rid)
                       for i, rid in enumerate(["a", "bad", "b"])])
    # the client learns which request failed, not the exception's text (that goes to the log)
    assert isinstance(ev["bad"][-1], RequestFailed) and str(ev["bad"][-1]) == "internal error in request bad"
    for i, rid in ((0, "a"), (2, "b")):
        ref = generate(models.gpt, torch.tensor([i]), sp, seeds=torch.tensor([i]))[0]
        assert torch.equal(codes_of(ev, rid), ref)
    assert eng.scheduler.allocator.num_free == eng.scheduler.allocator.num_usable


def test_an_image_the_image_stage_fails_is_counted_as_an_error(monkeypatch):
    """The image stage fails one image (its device-to-host copy raises): that request ends with an error and is
    counted as one; the others arrive and are counted as ok. (It was counted ok, and as an image, at its last
    token, before the stage ran.)"""
    import adsa_core.engine.imaging as imaging

    real, calls = imaging._to_host, []

    def to_host(t):
        calls.append(t)
        if len(calls) == 3:  # the second image's codes (each image is a chunk of its own on the CPU)
            raise RuntimeError("injected copy fault")
        return real(t)

    monkeypatch.setattr(imaging, "_to_host", to_host)
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=4.0, greedy=True)
    eng = make_engine(models, max_batch_size=1)  # one at a time: the images reach the stage in request order
    ev = run_all(eng, [GenerationRequest(condition=i, seed=i, sampling=sp, request_id=str(i)) for i in range(3)])
    assert [type(ev[rid][-1]).__name__ for rid in "012"] == ["Finished", "RequestFailed", "Finished"]
    stats = eng.stats()
    assert stats.requests_total_by_status == {"ok": 2, "error": 1} and stats.images_total == 2


def test_deadline_exceeded():
    eng = make_engine(tiny_models(UNSEEN))
    events = []
    eng.submit(GenerationRequest(condition=1, seed=0, deadline=time.monotonic() - 1, request_id="late"),
               events.append)
    eng.step()
    assert isinstance(events[-1], DeadlineExceeded) and isinstance(events[-1], EngineError)
    assert not eng.has_work


def test_cfg_interval_drops_the_unconditional_row_without_changing_output():
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=4.0, cfg_interval=5, greedy=True)
    eng = make_engine(models)
    ev = run_all(eng, [GenerationRequest(condition=3, seed=0, sampling=sp, request_id="i")])
    ref = generate(models.gpt, torch.tensor([3]), sp, seeds=torch.tensor([0]))[0]
    assert torch.equal(codes_of(ev, "i"), ref)


def test_rows_freed_by_cfg_interval_never_admit_more_images_than_the_batch_holds():
    """Requests past their CFG interval give their unconditional row back, so rows are free while every image
    slot of the batch is held: the next requests wait for a slot (they used to crash the scheduler)."""
    models = tiny_models(UNSEEN)
    sp = SamplingParams(cfg_scale=4.0, cfg_interval=2, greedy=True)
    eng = make_engine(models, max_batch_size=2)
    reqs = [GenerationRequest(condition=i, seed=i, sampling=sp, request_id=str(i)) for i in range(4)]
    events: dict[str, list] = {}
    for r in reqs[:2]:
        eng.submit(r, lambda ev, rid=r.request_id: events.setdefault(rid, []).append(ev))
    for _ in range(4):  # past the interval: two rows of four are free, both slots held
        eng.step()
    for r in reqs[2:]:
        eng.submit(r, lambda ev, rid=r.request_id: events.setdefault(rid, []).append(ev))
    running = []
    while eng.has_work:
        eng.step()
        running.append(len(eng.scheduler.running))
    eng.close()
    assert max(running) == 2
    for r in reqs:
        ref = generate(models.gpt, torch.tensor([r.condition]), sp, seeds=torch.tensor([r.seed]))[0]
        assert torch.equal(codes_of(events, r.request_id), ref)


def test_teacher_forcing_returns_log_probs_of_forced_tokens():
    models = tiny_models(UNSEEN)
    forced = torch.randint(0, UNSEEN.vocab_size, (UNSEEN.block_size,))
    eng = make_engine(models)
    ev = run_all(eng, [GenerationRequest(condition=3, seed=0, sampling=SamplingParams(cfg_scale=1.0),
                                         forced_tokens=forced, want_logits=True, request_id="f")])
    fin = ev["f"][-1]
    assert torch.equal(fin.codes, forced)
    full = models.gpt(forced[None, :-1], torch.tensor([3]))[0]  # teacher-forced reference logits
    assert torch.allclose(fin.logprobs, torch.log_softmax(full, -1), atol=1e-4)


def test_the_loop_itself_delivers_every_image_before_it_goes_idle():
    """No image thread (it would share the loop's GIL): the engine has work until its image stage has handed
    out every finished image, so a caller stepping while `has_work` gets them all without `close()`."""
    engine = make_engine(tiny_models())
    threads = threading.active_count()
    events: list = []
    for seed in range(3):
        engine.submit(GenerationRequest(condition=seed, seed=seed, sampling=SamplingParams(cfg_scale=2.0)),
                      events.append)
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
        assert threading.active_count() == threads
    finished = [ev for ev in events if isinstance(ev, Finished)]
    assert len(finished) == 3 and all(ev.codes.shape == (engine.cfg.block_size,) for ev in finished)
    assert not engine.images.busy and steps >= engine.cfg.block_size
    engine.close()


def test_a_class_label_enters_through_the_decode_step_whatever_the_vocabulary():
    """A c2i row's first decode step embeds its class label (labels may exceed the image vocabulary, and image
    tokens the label table) as the condition token; later positions embed image tokens. The engine then draws
    LlamaGen's tokens for labels beyond the vocabulary too."""
    cfg = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, block_size=9, num_classes=40)
    models = tiny_models(cfg, seed=3)
    gpt = models.gpt
    tokens, positions = torch.tensor([39, 40, 15, 3]), torch.tensor([0, 0, 5, 1])
    with torch.no_grad():
        got = gpt.embed_step(tokens, positions)[:, 0]
        want = torch.cat([gpt.embed_condition(tokens[:2])[:, 0], gpt.tok_embeddings(tokens[2:])])
    assert torch.equal(got, want)
    sp = SamplingParams(cfg_scale=4.0, greedy=True)
    labels = torch.tensor([39, 17])
    reqs = [GenerationRequest(condition=int(c), seed=i, sampling=sp, request_id=str(i)) for i, c in enumerate(labels)]
    ev = run_all(make_engine(models), reqs)
    got_codes = torch.stack([codes_of(ev, "0"), codes_of(ev, "1")])
    assert torch.equal(got_codes, generate(gpt, labels, sp, seeds=torch.tensor([0, 1])))


def test_the_warm_up_capture_runs_without_autograd(monkeypatch):
    """The server captures every bucket's graph at warm-up (`capture_graphs`), outside any step. The weights
    require grad, so a capture under autograd makes torch.compile trace a backward through the skinny matmul's
    custom op, which has none, and the engine fails to start (a GPU server at main 24f18db, run 31)."""
    eng = make_engine(tiny_models(), "adsa", 0.5)
    assert any(p.requires_grad for p in eng.models.gpt.parameters())  # what made the capture trace a backward
    grad_enabled: list[bool] = []
    monkeypatch.setattr(eng.runner, "use_graphs", True)  # as on a GPU
    monkeypatch.setattr(eng.runner, "_capture", lambda B, then, key: grad_enabled.append(torch.is_grad_enabled()))
    assert eng.runner.capture_all() == len(eng.runner.buckets) == len(grad_enabled)
    assert not any(grad_enabled)
    eng.close()
