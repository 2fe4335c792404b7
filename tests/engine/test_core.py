"""The engine-core loop's message handling, in-process (no sockets): a submission that cannot even be read
is refused with an error ack and the core goes on serving."""

from __future__ import annotations

import dataclasses

from adsa_core.config import CacheConfig, EngineConfig, VQConfig, min_budget
from adsa_core.engine import wire
from adsa_core.engine.core import EngineCore, model_info
from adsa_core.engine.request import GenerationRequest
from adsa_core.model.vq import VQModel

from .test_engine import UNSEEN, make_engine, tiny_models


class RecordingOutbox:
    """Outbox stand-in: keeps what the core would send."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.batch: list[list] = []

    def send(self, msg: dict) -> None:
        self.sent.append(wire.loads(wire.dumps(msg)))  # what would cross the socket

    def sink(self, rid: str):
        return lambda ev: self.batch.append(wire.event_to_wire(rid, ev))


def test_an_unreadable_submission_is_refused_and_the_core_keeps_serving():
    outbox = RecordingOutbox()
    core = EngineCore(tiny_models(UNSEEN), EngineConfig(max_batch_size=2, decode_images=False), outbox)  # type: ignore
    assert core.handle({"t": "add", "batch": 0, "reqs": [{"id": "broken", "seed": 1}]})  # fields missing
    refused = ["internal_error", "internal error while queueing the request", None]  # kind, message, field
    assert outbox.sent[-1] == {"t": "ack", "batch": 0, "error": refused}
    assert not core.engine.has_work  # nothing was queued
    good = wire.request_to_wire(GenerationRequest(condition=2, seed=3, request_id="good"))
    assert core.handle({"t": "add", "batch": 1, "reqs": [good]})
    assert outbox.sent[-1] == {"t": "ack", "batch": 1, "error": None}
    while core.engine.has_work:
        core.step()
    assert [kind for rid, kind, _ in outbox.batch if rid == "good"][-1] == "finished"  # the loop delivered it
    core.close()


def test_the_model_card_minimum_budget_follows_the_servers_local_window():
    """ADSA_KV_LOCAL raises the smallest budget that runs: the card (and the playground's slider) say so."""
    models = tiny_models(UNSEEN)  # 6 x 6 grid
    assert model_info(models, make_engine(models, "adsa", 0.5)).min_budget == min_budget(UNSEEN) == 9
    eng = make_engine(models, "adsa", 0.75, local=20)
    assert model_info(models, eng).min_budget == 22  # larger than the condition token + 20
    eng.submit(GenerationRequest(condition=1, seed=0, cache=CacheConfig(policy="adsa", budget=22, local=20)),
               lambda ev: None)


def test_the_model_card_says_whether_finished_images_are_decoded():
    """The API refuses image formats up front on a server whose engine decodes none (API.md, 501 no_decoder)."""
    models = tiny_models(UNSEEN)  # tokens only
    assert not model_info(models, make_engine(models, "adsa", 0.5)).has_decoder
    vq_config = VQConfig(codebook_size=UNSEEN.vocab_size, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=32,
                         ch=32)
    models = dataclasses.replace(models, vq=VQModel(vq_config).eval(), vq_config=vq_config)
    assert model_info(models, make_engine(models, "adsa", 0.5)).has_decoder
    assert not model_info(models, make_engine(models, "adsa", 0.5, decode_images=False)).has_decoder
