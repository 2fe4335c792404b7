"""OpenAI compatibility: POST /v1/images/generations, model objects and error bodies.

In-process tests (FakeEngine) pin the route's rules; the live tests drive the real daemon (tiny model
with 1,000 ImageNet-named classes, JSON logs) with the official `openai` SDK, an independent client."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image
from server_fake_engine import fake_client
from server_live import API_KEY, LiveServer

openai = pytest.importorskip("openai")


def png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data)).size


# --- in process


@pytest.mark.anyio
async def test_images_by_class_name_with_native_options():
    async with fake_client() as (c, _):
        body = {"prompt": "Class3", "n": 2, "size": "64x64", "response_format": "b64_json", "seed": 40, "user": "u1"}
        r = await c.post("/v1/images/generations", json=body)
        assert r.status_code == 200 and r.headers["x-seed"] == "40", r.text
        out = r.json()
        assert out["size"] == "64x64" and out["output_format"] == "png" and len(out["data"]) == 2
        assert [png_size(d["b64_json"]) for d in out["data"]] == [(8, 8)] * 2  # the fake's PNGs
        # the same images as the native route with the class id and seed
        native = (await c.post("/v1/generate", json={"class_label": 3, "n": 2, "seed": 40})).json()
        assert [d["b64_json"] for d in out["data"]] == [d["b64_json"] for d in native["data"]]
        # one class token in and 16 image tokens out per image (the fake's grid)
        assert out["usage"] == {
            "input_tokens": 2,
            "input_tokens_details": {"text_tokens": 2, "image_tokens": 0},
            "output_tokens": 32,
            "output_tokens_details": {"image_tokens": 32, "text_tokens": 0},
            "total_tokens": 34,
        }
        r = await c.post("/v1/images/generations", json={"prompt": "7"})  # class id; size auto by default
        assert r.status_code == 200 and len(r.json()["data"]) == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body, status, code, param, fragment",
    [
        ({"prompt": "class3", "size": "1024x1024"}, 400, "invalid_request", "size", "this model makes 64x64 images"),
        ({"prompt": "class3", "response_format": "url"}, 400, "invalid_request", "response_format", "b64_json"),
        ({"prompt": "clas 3"}, 400, "invalid_request", "prompt", "closest: 'class3' (3)"),
        ({"prompt": "class3", "quality": "hd"}, 400, "invalid_request", "quality", "(auto or standard)"),
        ({"prompt": "class3", "qualty": "hd"}, 400, "invalid_request", "qualty", "Extra inputs"),  # not OpenAI's
        ({"prompt": "class3", "n": 17}, 400, "invalid_request", "n", "less than or equal to 16"),
        ({"prompt": "class3", "kv_budget": 7}, 400, "invalid_request", "kv_budget", "kv budget 7"),  # the engine's
        ({"prompt": "class3", "policy": "nope"}, 400, "invalid_request", "policy", "unknown policy"),
        ({"prompt": "class3", "model": "dall-e-3"}, 404, "model_not_found", "model", "not served here"),
        ({"n": 2}, 400, "invalid_request", "prompt", "Field required"),
    ],
)
async def test_images_errors_are_openai_400s(body, status, code, param, fragment):
    async with fake_client() as (c, _):
        r = await c.post("/v1/images/generations", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert (err["code"], err["param"]) == (code, param) and fragment in err["message"], err
        assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


# every OpenAI image parameter with each value that changes nothing here: this server makes opaque PNGs, inline
_OPENAI_NO_OPS = {
    "quality": ["auto", "standard"],
    "output_format": ["png"],
    "output_compression": [100],
    "background": ["auto", "opaque"],
    "moderation": ["auto", "low"],
    "stream": [False],
    "partial_images": [0],
    "response_format": ["b64_json"],
    "user": ["user-1234"],
    "safety_identifier": ["5f2b9c"],
    "style": [None],
    "complexity": [None],
    "frame_count": [None],
    "frame_duration_ms": [None],
    "svg": [None],
}


@pytest.mark.anyio
async def test_openai_parameters_with_values_that_change_nothing_are_taken():
    async with fake_client() as (c, _):
        plain = await c.post("/v1/images/generations", json={"prompt": "class3", "seed": 5})
        assert plain.status_code == 200, plain.text
        for field, values in _OPENAI_NO_OPS.items():
            for value in values:
                r = await c.post("/v1/images/generations", json={"prompt": "class3", "seed": 5, field: value})
                assert r.status_code == 200, (field, value, r.text)
                assert r.json()["data"] == plain.json()["data"], (field, value)  # the same image
        everything = {k: v[-1] for k, v in _OPENAI_NO_OPS.items()}
        r = await c.post("/v1/images/generations", json={"prompt": "class3", "seed": 5, **everything})
        assert r.status_code == 200 and r.json()["data"] == plain.json()["data"], r.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("quality", "hd", "'hd' is not supported; this server has one quality (auto or standard)"),
        ("quality", "high", "(auto or standard)"),
        ("quality", "ultra", "(auto or standard)"),  # not even OpenAI's: worded the same
        ("style", "vivid", "'vivid' is not supported; this server has no styles"),
        ("style", "natural", "no styles"),
        ("output_format", "jpeg", "images are PNG (png)"),
        ("output_format", "webp", "images are PNG (png)"),
        ("output_compression", 80, "80 is not supported; PNG is lossless (100"),
        ("background", "transparent", "images are opaque (auto or opaque)"),
        ("moderation", "none", "'auto' or 'low'"),
        ("stream", True, "true is not supported; this route does not stream (false); POST /v1/generate streams"),
        ("stream", 0, "this route does not stream (false)"),  # JSON's 0 is not false
        ("partial_images", 2, "POST /v1/generate streams previews"),
        ("response_format", "url", "images come back inline only (b64_json)"),
        ("complexity", "high", "no complexity setting"),
        ("frame_count", 4, "not GIF"),
        ("svg", {"model": "x"}, "not SVG"),
    ],
)
async def test_openai_parameters_the_server_cannot_honour_are_400s_saying_what_it_takes(field, value, fragment):
    async with fake_client() as (c, engine):
        r = await c.post("/v1/images/generations", json={"prompt": "class3", field: value})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["code"], err["param"], err["type"]) == ("invalid_request", field, "invalid_request_error"), err
        assert err["message"].startswith(f"{field}: ") and fragment in err["message"], err
        assert engine.images == 0  # refused before anything ran


@pytest.mark.anyio
async def test_images_text_model_reads_the_prompt_as_text():
    async with fake_client(model_type="t2i") as (c, _):
        r = await c.post("/v1/images/generations", json={"prompt": "a red fox in the snow", "n": 2})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert r.json()["usage"]["input_tokens"] == 2 * 120  # the fake encoder's full caption mask
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["class_prompt"] is None


@pytest.mark.anyio
async def test_model_objects_are_complete():
    before = int(time.time())
    async with fake_client() as (c, _):
        for card in ((await c.get("/v1/models")).json()["data"][0], (await c.get("/v1/models/fake-demo")).json()):
            assert card["object"] == "model" and card["owned_by"] == "adsa-serve"
            assert before - 1 <= card["created"] <= time.time()
            assert "class id as digits (0..9)" in card["class_prompt"]


@pytest.mark.anyio
async def test_request_ids_honoured_echoed_and_exposed():
    async with fake_client() as (c, _):
        r = await c.post("/v1/images/generations", json={"prompt": "class1"}, headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        r = await c.post("/v1/generate", json={}, headers={"X-Request-Id": "err.7"})  # errors too
        assert r.status_code == 422 and r.headers["x-request-id"] == "err.7"
        for bad in ("has space", "x" * 129, 'quote"d'):  # malformed: replaced by a fresh id
            r = await c.get("/healthz", headers={"X-Request-Id": bad})
            assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32
        a, b = (await c.get("/nope")).headers["x-request-id"], (await c.get("/metrics")).headers["x-request-id"]
        assert a != b
    from server import Settings

    async with fake_client(Settings(_env_file=None, cors_origins="https://ui.example")) as (c, _):
        r = await c.post("/v1/generate", json={"class_label": 1}, headers={"Origin": "https://ui.example"})
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        pre = await c.options(
            "/v1/generate",
            headers={
                "Origin": "https://ui.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-request-id",
            },
        )
        assert pre.status_code == 200 and "x-request-id" in pre.headers["access-control-allow-headers"].lower()


@pytest.mark.anyio
async def test_unhandled_exception_is_a_500_with_the_api_body_and_request_id():
    async with fake_client() as (c, engine):

        def boom(req):
            raise RuntimeError("secret detail")

        engine.submit = boom
        r = await c.post("/v1/generate", json={"class_label": 1}, headers={"X-Request-Id": "boom-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
        assert r.json()["error"] == {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }


# --- the live daemon with the official openai client


@pytest.fixture
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_openai_client_generates_imagenet_class_by_name(client, live_server):
    model = client.models.list().data[0]
    resp = client.images.generate(
        model=model.id,
        prompt="Golden Retriever",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 1234, "policy": "adsa", "kv_budget": 0.5},
    )
    assert len(resp.data) == 2 and resp.size == "32x32"
    assert [png_size(d.b64_json) for d in resp.data] == [(32, 32)] * 2
    assert resp.data[0].b64_json != resp.data[1].b64_json
    assert resp.usage.output_tokens == 2 * 64 and resp.usage.input_tokens == 2  # 8x8 tokens, one class token
    # the same pixels as the native route asked for class 207 with the same seed and options
    native = httpx.post(
        live_server.url + "/v1/generate",
        json={"class_label": 207, "n": 2, "seed": 1234, "policy": "adsa", "kv_budget": 0.5},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ).json()
    assert [d.b64_json for d in resp.data] == [d["b64_json"] for d in native["data"]]


def test_openai_client_lists_complete_model_objects(client):
    models = client.models.list().data
    assert len(models) == 1
    m = models[0]
    assert m.object == "model" and m.owned_by == "adsa-serve" and 0 < m.created <= time.time()
    card = client.models.retrieve(m.id)
    assert card.id == m.id and card.created == m.created
    extra = card.model_extra  # this server's fields beyond OpenAI's
    assert extra["num_classes"] == 1000 and extra["classes"][207]["name"] == "golden retriever"
    assert "tabby cat" in extra["classes"][281]["synonyms"] and extra["class_prompt"]


def test_openai_client_reads_error_code_and_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="golden retreiver", size="32x32")
    assert e.value.status_code == 400 and e.value.code == "invalid_request" and e.value.param == "prompt"
    assert e.value.type == "invalid_request_error" and "closest: 'golden retriever' (207)" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="tench", size="1024x1024")
    assert (e.value.code, e.value.param) == ("invalid_request", "size") and "32x32" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # the engine core's refusal, named in this API's words
        client.images.generate(prompt="tench", extra_body={"kv_budget": 3})
    assert (e.value.code, e.value.param) == ("invalid_request", "kv_budget") and "kv budget 3" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="crane")  # two ImageNet classes are called crane
    assert "134 (crane), 517 (crane)" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="tench")
    assert (e.value.code, e.value.param, e.value.type) == ("model_not_found", "model", "not_found_error")
    bad_key = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.models.list()
    assert e.value.code == "unauthorized" and e.value.type == "authentication_error"


def test_openai_client_standard_parameters(client):
    """What the SDK's own parameters send: taken where the server honours the value or it changes nothing, else a
    BadRequestError naming the parameter and what the server takes."""
    resp = client.images.generate(
        prompt="tench",
        size="32x32",
        quality="standard",
        output_format="png",
        output_compression=100,
        background="opaque",
        moderation="low",
        partial_images=0,
        stream=False,
        user="user-1234",
        safety_identifier="5f2b9c",
        extra_body={"seed": 3},
    )
    assert len(resp.data) == 1 and png_size(resp.data[0].b64_json) == (32, 32) and resp.output_format == "png"
    for kw, fragment in [
        ({"quality": "hd"}, "(auto or standard)"),
        ({"style": "vivid"}, "no styles"),
        ({"output_format": "webp"}, "images are PNG (png)"),
        ({"background": "transparent"}, "images are opaque (auto or opaque)"),
        ({"stream": True}, "POST /v1/generate streams (stream: true)"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="tench", **kw)
        assert (e.value.code, e.value.param) == ("invalid_request", next(iter(kw))), e.value.message
        assert fragment in e.value.message


def test_request_id_in_every_log_line_about_the_request(live_server):
    """ADSA_LOG_FORMAT=json (the live server's): the access line and the failure line carry the id."""
    with live_server.client(headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        ok = c.post("/v1/images/generations", json={"prompt": "tench"}, headers={"X-Request-Id": "trace-ok-1"})
        bad = c.post(
            "/v1/generate", json={"class_label": 1, "n": 16, "timeout_s": 0.01}, headers={"X-Request-Id": "trace-504-1"}
        )
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-ok-1"
    assert bad.status_code == 504 and bad.headers["x-request-id"] == "trace-504-1"
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in live_server.logs().splitlines() if line.startswith("{")]
        access = {r.get("request_id"): r for r in lines if r["logger"] == "adsa.access"}
        if {"trace-ok-1", "trace-504-1"} <= set(access) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    ok_line = access["trace-ok-1"]
    assert ok_line["level"] == "INFO" and ok_line["status"] == 200 and ok_line["path"] == "/v1/images/generations"
    assert ok_line["method"] == "POST" and ok_line["duration_s"] > 0 and "time" in ok_line
    assert access["trace-504-1"]["status"] == 504
    failed = [r for r in lines if r["logger"] == "adsa.server" and r.get("request_id") == "trace-504-1"]
    assert failed and failed[0]["level"] == "WARNING" and "deadline" in failed[0]["message"]
    # every line logged while a request ran names it; lines outside any request say "-"
    assert all("request_id" in r for r in lines)
