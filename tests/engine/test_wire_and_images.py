"""What crosses the process boundary (msgpack frames, tensors as raw bytes) comes back equal, and the image
stage's padded static chunks keep an image's pixels independent of the images finishing beside it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adsa_core.config import CacheConfig
from adsa_core.engine import imaging, wire
from adsa_core.engine import request as rq
from adsa_core.engine.imaging import DoneImage, ImageStage
from adsa_core.engine.request import EngineStats, RequestStats
from adsa_core.images import to_uint8
from adsa_core.sampling import SamplingParams


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bfloat16, torch.float32, torch.bool])
def test_tensors_cross_as_raw_bytes(dtype):
    t = (torch.randn(3, 5, 2) * 100).to(dtype)
    back = wire.loads(wire.dumps({"x": t, "scalar": torch.tensor(7), "empty": torch.zeros(0, 4)}))
    assert back["x"].dtype == dtype and torch.equal(back["x"], t)
    assert back["scalar"].shape == () and int(back["scalar"]) == 7 and back["empty"].shape == (0, 4)


def test_requests_events_and_stats_round_trip():
    req = rq.GenerationRequest(condition=3, seed=2**62, sampling=SamplingParams(cfg_scale=2.5, top_k=40),
                               cache=CacheConfig(policy="window", budget=0.25, local=9), priority=2, deadline=123.5,
                               preview_every_rows=2, progress=False, request_id="abc-0")
    back = wire.request_from_wire(wire.loads(wire.dumps(wire.request_to_wire(req))))
    assert back == req
    t2i = rq.GenerationRequest(condition=None, prompt="a red fox", seed=1, emb_mask=torch.ones(4, dtype=torch.bool))
    back = wire.request_from_wire(wire.loads(wire.dumps(wire.request_to_wire(t2i))))
    assert back.prompt == "a red fox" and torch.equal(back.emb_mask, t2i.emb_mask)
    with pytest.raises(ValueError, match="offline"):
        wire.request_to_wire(dataclasses.replace(req, want_logits=True))

    pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8)
    stats = rq.RequestStats(queue_s=0.5, evictions=7, kv_bytes=1024)
    events = [rq.Progress(3, 9), rq.PartialImage(3, 1, pixels[:2]),
              rq.Finished(torch.arange(9), pixels, stats), rq.QueueFull("9 waiting"), rq.EngineDead("gone"),
              rq.InvalidRequest("class label 9 is outside 0..7", "condition"), rq.InvalidRequest("no field")]
    for ev in events:
        rid, kind, payload = wire.loads(wire.dumps({"e": wire.event_to_wire("r", ev)}))["e"]
        got = wire.event_from_wire(kind, payload)
        assert rid == "r" and type(got) is type(ev)
        if isinstance(ev, rq.EngineError):
            assert str(got) == str(ev)
            if isinstance(ev, rq.InvalidRequest):
                assert isinstance(got, rq.InvalidRequest) and got.field == ev.field  # the server's `param`
        elif isinstance(ev, rq.Finished):
            assert torch.equal(got.codes, ev.codes) and torch.equal(got.pixels, ev.pixels) and got.stats == stats
        elif isinstance(ev, rq.PartialImage):
            assert torch.equal(got.pixels, ev.pixels) and (got.tokens_done, got.rows_done) == (3, 1)
        else:
            assert got == ev
    old = wire.error_from_wire(["invalid_request", "from a core that sends no field"])  # [kind, message]
    assert isinstance(old, rq.InvalidRequest) and old.field is None
    s = EngineStats(running=2, evictions_total=5, requests_total_by_status={"ok": 3})
    assert wire.stats_from_wire(wire.loads(wire.dumps(wire.stats_to_wire(s)))) == s


def test_padded_chunks_give_each_image_its_own_pixels(vq_model, vq_io):
    """Decoded in chunks of 4 padded to 4, an image's pixels are those it gets decoded alone (batch of 1 padded
    to 4) and do not depend on its neighbours or its place in the chunk."""
    grid = vq_io["codes"].shape[-1] if vq_io["codes"].dim() == 3 else int(vq_io["codes"].shape[-1] ** 0.5)
    codebook = vq_model.config.codebook_size
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, codebook, (6, grid * grid), generator=gen)
    stage = ImageStage(vq_model, torch.device("cpu"), chunk=4)
    try:
        together = stage.decode(codes)  # chunks [0..3], [4, 5 + padding]
        assert together.shape[0] == 6 and together.dtype == torch.uint8
        for i in range(6):
            alone = stage.decode(codes[i: i + 1])
            assert torch.equal(together[i], alone[0]), i
        shuffled = stage.decode(codes.flip(0))
        assert torch.equal(shuffled.flip(0), together)
        with torch.no_grad():  # and it is the VQ decoder's image, converted as LlamaGen does
            assert torch.equal(together[0], to_uint8(vq_model.decode_code(codes[:1]))[0])
    finally:
        stage.close()


def test_a_saturated_engine_decodes_full_chunks_and_an_idle_one_at_once(monkeypatch):
    """A chunk costs the same GPU time however few of its images are real: while requests wait for the batch,
    the stage launches only full chunks, or a partial one whose oldest image waited MAX_WAIT_S; otherwise it
    launches what it has. Each image reaches its own sink with its own codes, in order."""
    stage = ImageStage(None, torch.device("cpu"), chunk=4)
    got: list[tuple[int, torch.Tensor]] = []

    def done(i: int) -> DoneImage:
        return DoneImage(lambda ev, i=i: got.append((i, ev.codes)), torch.full((6,), i), RequestStats(), None)

    stage.finish([done(0), done(1), done(2)])
    stage.poll(saturated=True)
    stage.poll(saturated=True)
    assert stage.chunks_launched == 0 and not got and stage.busy  # 3 of 4: waits for a full chunk
    stage.finish([done(3), done(4)])
    stage.poll(saturated=True)  # launches 0-3; 4 waits
    stage.poll(saturated=True)  # delivers them
    assert stage.chunks_launched == 1 and [i for i, _ in got] == [0, 1, 2, 3]
    monkeypatch.setattr(imaging, "MAX_WAIT_S", 0.0)  # image 4 has waited long enough
    stage.poll(saturated=True)
    stage.poll(saturated=True)
    assert stage.chunks_launched == 2 and [i for i, _ in got] == [0, 1, 2, 3, 4]
    monkeypatch.setattr(imaging, "MAX_WAIT_S", 60.0)
    stage.finish([done(5)])
    stage.poll()  # not saturated: at once
    stage.poll()
    assert stage.chunks_launched == 3 and not stage.busy
    assert all(torch.equal(codes, torch.full((6,), i)) for i, codes in got)
    stage.close()


def test_previews_never_hold_back_finished_images(vq_model, vq_io):
    """Finished images launch before previews and previews have their own in-flight limit, so a busy
    streaming batch cannot starve them; a request keeps only its latest queued preview, and none once its
    image is finished (a preview never follows its image)."""
    grid = vq_io["codes"].shape[-1] if vq_io["codes"].dim() == 3 else int(vq_io["codes"].shape[-1] ** 0.5)
    codes = torch.randint(0, vq_model.config.codebook_size, (grid * grid,), generator=torch.Generator().manual_seed(0))
    stage = ImageStage(vq_model, torch.device("cpu"), chunk=2)
    seen: list[tuple[str, str]] = []

    def sink(name: str):
        return lambda ev: seen.append((name, type(ev).__name__))

    sinks = {name: sink(name) for name in "abcde"}
    for name in "abc":
        stage.preview(imaging.Preview(sinks[name], codes, 1, 1, 4))
    stage.preview(imaging.Preview(sinks["a"], codes, 2, 2, 8))  # replaces a's queued preview
    stage.preview(imaging.Preview(sinks["e"], codes, 1, 1, 4))
    stage.finish([DoneImage(sinks[name], codes, RequestStats(), None) for name in "de"])
    stage.poll()  # d and e's chunk first, then two previews (a, b); e's preview was dropped
    stage.poll()  # delivers them, launches c's preview
    assert seen == [("d", "Finished"), ("e", "Finished"), ("a", "PartialImage"), ("b", "PartialImage")]
    stage.close()
    assert seen[-1] == ("c", "PartialImage") and len(seen) == 5


def test_the_vq_decoder_is_compiled_on_a_gpu_only_and_autotuned_when_asked(monkeypatch, vq_model):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only named: nothing here touches a GPU
    assert imaging.vq_compile_mode(vq_model, cpu, compiled=True, autotune=True) is None
    assert imaging.vq_compile_mode(vq_model, cuda, compiled=False, autotune=True) is None
    assert imaging.vq_compile_mode(None, cuda, compiled=True, autotune=True) is None
    assert imaging.vq_compile_mode(vq_model, cuda, compiled=True, autotune=False) == "default"
    assert imaging.vq_compile_mode(vq_model, cuda, compiled=True, autotune=True) == imaging.VQ_AUTOTUNE_MODE
    # an eager image stage says so (the engine's log and adsa-bench's labels read it)
    assert ImageStage(vq_model, cpu, None, compile_decode=True, autotune=True).compile_mode is None
    compiled: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    assert imaging.vq_decoder(vq_model, None) == vq_model.decode_code and imaging.vq_decoder(None, "default") is None
    assert compiled == []
    imaging.vq_decoder(vq_model, "default")
    imaging.vq_decoder(vq_model, imaging.VQ_AUTOTUNE_MODE)
    # one static chunk shape; the autotuned decode without CUDA graphs (it runs on its own stream)
    assert compiled == [{"dynamic": False, "mode": "default"},
                        {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}]
