"""The HTTP layer in-process (httpx ASGITransport + FakeEngine): routing, validation, error mapping."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import pytest
from server_fake_engine import FakeEngine, fake_client

from server import Settings, create_app
from server.errors import to_api_error
from server.schemas import GenerateRequest
from server.service import _param_of

pytestmark = pytest.mark.anyio

S = lambda **kw: Settings(_env_file=None, **kw)  # noqa: E731


def parse_sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def assert_error(r, status: int, code: str, param: str | None = None) -> dict:
    """OpenAI's error body; returns its `error` object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["code"] == code and err["message"], body
    assert err["param"] == param, body
    assert r.headers["x-request-id"]  # errors carry the request id too
    return err


async def test_health_ready_models_openapi():
    async with fake_client() as (c, _):
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        assert (await c.get("/readyz")).json() == {"status": "ready"}
        models = (await c.get("/v1/models")).json()
        card = models["data"][0]
        assert card["id"] == "fake-demo" and card["model_type"] == "c2i" and card["num_classes"] == 10
        assert card["classes"][3] == {"id": 3, "name": "class3", "emoji": "*"}
        assert "adsa" in card["policies"] and card["limits"]["max_images_per_request"] == 16
        assert card["kv_cache_dtype"] == "auto"
        assert (await c.get("/v1/models/fake-demo")).json()["id"] == "fake-demo"
        assert_error(await c.get("/v1/models/other"), 404, "model_not_found")
        spec = (await c.get("/openapi.json")).json()
        assert {"/v1/generate", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
        assert (await c.get("/docs")).status_code == 200
        # the schema promises the answers the routes give: OpenAI's route refuses bad input with 400, in the API's
        # error body, and never with FastAPI's own 422 body (which a schema-generated client would expect)
        images = spec["paths"]["/v1/images/generations"]["post"]["responses"]
        assert "422" not in images and images["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorBody")
        assert "422" not in spec["paths"]["/v1/models/{model_id}"]["get"]["responses"]
        assert "HTTPValidationError" not in json.dumps(spec)
        r = await c.post("/v1/images/generations", json={"prompt": "class3", "n": "two"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


async def test_model_card_reports_kv_cache_dtype():
    async with fake_client(S(kv_cache_dtype="fp8")) as (c, _):
        assert (await c.get("/v1/models")).json()["data"][0]["kv_cache_dtype"] == "fp8"
        assert (await c.get("/v1/models/fake-demo")).json()["kv_cache_dtype"] == "fp8"


async def test_generate_json_png_and_alias():
    async with fake_client() as (c, _):
        r = await c.post("/v1/generate", json={"class_label": 3, "n": 2, "seed": 40})
        assert r.status_code == 200 and r.headers["x-seed"] == "40"
        body = r.json()
        assert body["seed"] == 40 and [d["seed"] for d in body["data"]] == [40, 41]
        assert base64.b64decode(body["data"][0]["b64_json"]).startswith(b"\x89PNG")
        assert body["data"][0]["kv_stats"]["evictions"] == 3
        r = await c.post("/generate", json={"class_labels": [1, 2, 3]})
        assert r.status_code == 200 and len(r.json()["data"]) == 3
        seed = int(r.headers["x-seed"])
        assert r.json()["seed"] == seed  # random seed is reported
        r = await c.post("/v1/generate", json={"class_label": 1, "response_format": "png"})
        assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
        r = await c.post("/v1/generate", json={"class_label": 1}, headers={"Accept": "image/png"})
        assert r.headers["content-type"] == "image/png"
        # `curl -d '{...}'` without -H Content-Type sends form-urlencoded, a browser's fetch of a string text/plain:
        # still JSON to us
        for ctype in ("application/x-www-form-urlencoded", "text/plain;charset=UTF-8", None):
            headers = {"Accept": "image/png"} | ({"Content-Type": ctype} if ctype else {})
            r = await c.post("/v1/generate", content=b'{"class_label": 3}', headers=headers)
            assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
        # n > 1 with Accept: image/png falls back to JSON; JSON listed first wins
        r = await c.post("/v1/generate", json={"class_label": 1, "n": 2}, headers={"Accept": "image/png"})
        assert r.headers["content-type"] == "application/json"
        r = await c.post("/v1/generate", json={"class_label": 1}, headers={"Accept": "application/json, image/png"})
        assert r.headers["content-type"] == "application/json"


async def test_same_seed_same_bytes():
    async with fake_client() as (c, _):
        a = (await c.post("/v1/generate", json={"class_label": 2, "n": 2, "seed": 9})).json()
        b = (await c.post("/v1/generate", json={"class_label": 2, "n": 1, "seed": 10})).json()
        assert a["data"][1]["b64_json"] == b["data"][0]["b64_json"]


async def test_stream_events():
    async with fake_client() as (c, _):
        r = await c.post(
            "/v1/generate", json={"class_label": 1, "n": 2, "seed": 3, "stream": True, "preview_every_rows": 1}
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        kinds = [k for k, _ in events]
        assert kinds.count("image") == 2 and kinds[-1] == "done" and "partial_image" in kinds
        assert "progress" in kinds
        prog = next(d for k, d in events if k == "progress")
        assert set(prog) == {"index", "tokens_done", "total"}
        part = next(d for k, d in events if k == "partial_image")
        assert base64.b64decode(part["b64_json"]).startswith(b"\x89PNG") and part["rows_done"] >= 1
        images = sorted((d for k, d in events if k == "image"), key=lambda d: d["index"])
        assert [d["seed"] for d in images] == [3, 4]
        assert events[-1][1]["stats"]["images"] == 2


async def test_stream_without_previews_by_default_setting():
    async with fake_client(S(preview_every_rows=0)) as (c, _):
        r = await c.post("/v1/generate", json={"class_label": 1, "stream": True})
        assert "partial_image" not in [k for k, _ in parse_sse(r.text)]


@pytest.mark.parametrize("budget,message", [
    (1.5, "kv budget fraction 1.5 is outside (0, 1]"),
    (0, "kv budget 0 tokens must be positive"),
    ("abc", "kv budget must be a number: a token count or a fraction, not 'abc'"),
    ("none", "kv budget must be a number: a token count or a fraction, not 'none'"),  # JSON's null: the default
    ("1/4", "kv budget must be a number: a token count or a fraction, not '1/4'"),
    (True, "kv budget must be a token count or a fraction, not a boolean"),
    (2_000_000, "kv budget 2000000 tokens is larger than any model's sequence"),
])
async def test_a_bad_kv_budget_names_the_field_and_says_why(budget, message):
    """One budget check for the API, the CLI and the settings: the same words, and `param` is the field."""
    async with fake_client() as (c, _):
        r = await c.post("/v1/generate", json={"class_label": 1, "kv_budget": budget})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == "kv_budget" and err["message"] == f"kv_budget: {message}", err


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({}, "exactly one of"),
        ({"class_label": 1, "prompt": "x"}, "exactly one of"),
        ({"class_label": -1}, "class_label"),
        ({"class_label": 10}, "is outside 0..9"),  # model-dependent: checked against ModelInfo
        ({"class_labels": []}, "class_labels"),
        ({"class_labels": [1, 2], "n": 3}, "n=3"),
        ({"class_label": 1, "n": 0}, "n:"),
        ({"class_label": 1, "n": 17}, "n:"),
        ({"class_label": 1, "n": "2"}, "valid integer"),
        ({"class_label": "1"}, "class_label"),
        ({"class_label": True}, "class_label"),
        ({"class_label": 1.5}, "class_label"),
        ({"class_label": 1, "seed": -1}, "seed"),
        ({"class_label": 1, "temperature": 0}, "temperature"),
        ({"class_label": 1, "top_p": 0}, "top_p"),
        ({"class_label": 1, "top_k": -1}, "top_k"),
        ({"class_label": 1, "cfg_scale": -1}, "cfg_scale"),
        ({"class_label": 1, "cfg_interval": -2}, "cfg_interval"),
        ({"class_label": 1, "kv_budget": 1.5}, "kv_budget"),
        ({"class_label": 1, "kv_budget": 0}, "kv_budget"),
        ({"class_label": 1, "kv_budget": 7}, "kv budget"),  # the engine's own InvalidRequest
        ({"class_label": 1, "policy": "nope"}, "unknown policy"),
        ({"class_label": 1, "response_format": "url"}, "response_format"),
        ({"class_label": 1, "n": 2, "response_format": "png"}, "one image"),
        ({"class_label": 1, "stream": True, "response_format": "png"}, "not streamable"),
        ({"class_label": 1, "bogus": 1}, "bogus"),
        ({"prompt": "a red fox"}, "class-conditional"),
        ({"class_label": 1, "preview_every_rows": -1}, "preview_every_rows"),
        ({"class_label": 1, "timeout_s": 0}, "timeout_s"),
        ([1, 2], "JSON object"),
    ],
)
async def test_invalid_requests_are_422(body, fragment):
    async with fake_client() as (c, _):
        r = await c.post("/v1/generate", json=body)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and err["type"] == "invalid_request_error"
        assert fragment in err["message"], err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"class_label": 10}, "class_label"),
        ({"class_labels": [1, 10]}, "class_labels"),
        ({"prompt": "a red fox"}, "prompt"),
        ({"class_label": 1, "kv_budget": 7}, "kv_budget"),
    ],
)
async def test_an_engine_refusal_names_the_request_field(body, param):
    """The engine core knows its own request's fields (InvalidRequest.field); `param` is this API's name."""
    async with fake_client() as (c, _):
        r = await c.post("/v1/generate", json=body)
    assert_error(r, 422, "invalid_request", param)


@pytest.mark.parametrize(
    "field, body, param",
    [
        ("condition", {"class_label": 1}, "class_label"),
        ("condition", {"class_labels": [1, 2]}, "class_labels"),
        ("condition", {"prompt": "a fox"}, "prompt"),
        ("cache", {"class_label": 1, "kv_budget": 0.5}, "kv_budget"),
        ("cache", {"class_label": 1, "policy": "adsa"}, "policy"),
        ("cache", {"class_label": 1}, None),  # the server's own default budget: no field of the request
        ("n_images", {"class_label": 1, "n": 3}, "n"),
        ("n_images", {"class_labels": [1, 2]}, "class_labels"),
        ("seed", {"class_label": 1}, "seed"),
        ("sampling", {"class_label": 1}, "cfg_scale"),
        (None, {"class_label": 1}, None),
    ],
)
def test_every_engine_field_has_its_api_name(field, body, param):
    """The whole mapping, including refusals no fake-engine request reaches (a checkpoint without a null class)."""
    assert _param_of(field, GenerateRequest(**body)) == param


@pytest.mark.parametrize(
    "content, message, param",
    [
        # the request model's own checks across fields: the message alone, and the field they name, if one
        (
            '{"class_label": 1, "n": 2, "response_format": "png"}',
            "response_format png returns one image; use b64_json for n > 1",
            "response_format",
        ),
        (
            '{"class_label": 1, "stream": true, "response_format": "png"}',
            "stream=true sends base64 images; response_format png is not streamable",
            "response_format",
        ),
        ("{}", "give exactly one of class_label, class_labels or prompt", None),
        ('{"class_labels": [1, 2], "n": 3}', "n=3 but 2 class_labels were given", "n"),
        # a field's own check: the field, then the message
        ('{"class_label": 1, "n": 17}', "n: Input should be less than or equal to 16", "n"),
        # a body that is not an object at all, or none (curl -d '' sends an empty body)
        ("[1, 2]", "the request body must be a JSON object", None),
        ('"x"', "the request body must be a JSON object", None),
        ("", "the request body must be a JSON object", None),
    ],
)
async def test_validation_messages_are_exact(content, message, param):
    async with fake_client() as (c, _):
        r = await c.post("/v1/generate", content=content)  # no Content-Type, as `curl -d` sends it
        assert assert_error(r, 422, "invalid_request", param)["message"] == message


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/images/generations"])
async def test_a_body_sent_as_another_type_than_json_is_415_naming_both(path):
    """Even a JSON body: the client said it is something else. The types clients send JSON as without saying so
    (none, curl -d's form type, text/plain) stay JSON (test_generate_json_png_and_alias)."""
    body = {"class_label": 3} if path == "/v1/generate" else {"prompt": "class3"}
    async with fake_client() as (c, engine):
        r = await c.post(path, content=json.dumps(body), headers={"Content-Type": "application/xml; charset=utf-8"})
        err = assert_error(r, 415, "unsupported_media_type")
        assert err["message"] == (
            "Content-Type 'application/xml' is not supported: send the JSON body as application/json"
        )
        assert err["type"] == "invalid_request_error"
        r = await c.post(path, data={k: str(v) for k, v in body.items()}, files={"f": b"x"})  # multipart form
        assert "'multipart/form-data' is not supported" in assert_error(r, 415, "unsupported_media_type")["message"]
        assert engine.images == 0
        for ctype in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json", None):
            r = await c.post(path, content=json.dumps(body), headers={"Content-Type": ctype} if ctype else {})
            assert r.status_code == 200, (ctype, r.text)
        # where no route takes a POST body, the router's answer stands
        xml = {"Content-Type": "application/xml"}
        assert (await c.post("/healthz", content="<a/>", headers=xml)).status_code == 405
        assert (await c.post("/nope", content="<a/>", headers=xml)).status_code == 404
    async with fake_client(S(api_keys="k1")) as (c, _):  # a key is checked first, as for every POST a route takes
        r = await c.post(path, content=json.dumps(body), headers={"Content-Type": "application/xml"})
        assert_error(r, 401, "unauthorized")
        # where none takes it, the router's 404 or 405 without a key: the method or the path is what is wrong
        assert_error(await c.post("/metrics", content="{}"), 405, "method_not_allowed")
        assert (await c.post("/nope", content="x" * 100)).status_code == 404


async def test_probes_and_the_page_answer_head_as_get_without_a_body():
    """`curl -I`: GET's status and headers, no body (test_server_live checks the bytes on the wire)."""
    async with fake_client() as (c, engine):
        for path in ("/healthz", "/health", "/readyz", "/", "/static/playground.js"):
            get, head = await c.get(path), await c.head(path)
            assert head.status_code == get.status_code == 200 and head.content == b"", path
            assert {k: v for k, v in head.headers.items() if k != "x-request-id"} == {
                k: v for k, v in get.headers.items() if k != "x-request-id"
            }, path
        engine.die()
        assert (await c.head("/healthz")).status_code == 503  # the same answer, not only a 200
        paths = (await c.get("/openapi.json")).json()["paths"]
        assert set(paths["/healthz"]) == set(paths["/readyz"]) == {"get"}  # HEAD would repeat GET: not listed


@pytest.mark.parametrize("body, why", [(b"\xff{}", "can't decode byte 0xff"), (b"1" * 5000, "4300"),
                                       (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")])
async def test_json_that_python_cannot_read_is_invalid_json_saying_why(body, why):
    """What json.loads raises beyond JSONDecodeError: the message says what is wrong, not an exception's name."""
    async with fake_client() as (c, _):
        r = await c.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_json")
    message = r.json()["error"]["message"]
    assert why in message and "sys." not in message, message  # Python's advice is for the server, not the client


async def test_malformed_json_wrong_method_unknown_route_oversized():
    async with fake_client(S(max_body_bytes=2048)) as (c, _):
        r = await c.post("/v1/generate", content=b'{"class_label": ', headers={"Content-Type": "application/json"})
        assert_error(r, 422, "invalid_json")
        assert_error(await c.get("/v1/generate"), 405, "method_not_allowed")
        assert_error(await c.get("/v2/nothing"), 404, "not_found")
        big = json.dumps({"class_label": 1, "prompt": "x" * 5000})
        assert_error(
            await c.post("/v1/generate", content=big, headers={"Content-Type": "application/json"}),
            413,
            "payload_too_large",
        )

        async def chunks():  # no Content-Length: the streamed size is counted
            for _ in range(5):
                yield b" " * 1000

        r = await c.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert_error(r, 413, "payload_too_large")


async def test_api_keys():
    async with fake_client(S(api_keys="k1, k2")) as (c, _):
        assert_error(await c.post("/v1/generate", json={"class_label": 1}), 401, "unauthorized")
        r = await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(await c.post("/generate", json={"class_label": 1}), 401, "unauthorized")
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer k2"})).status_code == 200
        ok = await c.post("/v1/generate", json={"class_label": 1}, headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes stay open
            assert (await c.get(path)).status_code == 200


async def test_queue_full_is_429_with_retry_after_and_nothing_left_queued():
    async with fake_client(max_queue=3, step_s=0.05) as (c, engine):
        r = await c.post("/v1/generate", json={"class_label": 1, "n": 5})
        assert_error(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) >= 1
        await asyncio.sleep(0.2)
        # all or nothing: no image of the job was ever queued, so none ran or had to be withdrawn
        assert engine.by_status == {} and engine.images == 0
        assert not engine.waiting and not engine.running


async def test_deadline_is_504():
    async with fake_client(S(request_timeout_s=0.05), step_s=0.02) as (c, _):
        assert_error(await c.post("/v1/generate", json={"class_label": 1}), 504, "deadline_exceeded")
    async with fake_client(step_s=0.02) as (c, _):  # a request's own timeout_s
        assert_error(await c.post("/v1/generate", json={"class_label": 1, "timeout_s": 0.05}), 504, "deadline_exceeded")


async def test_engine_failure_is_500_and_sse_error_event():
    async with fake_client(fail_labels=(7,)) as (c, _):
        assert_error(await c.post("/v1/generate", json={"class_label": 7}), 500, "internal_error")
        r = await c.post("/v1/generate", json={"class_labels": [1, 7], "stream": True})
        events = parse_sse(r.text)
        assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "internal_error"
        assert events[-1][1]["error"]["type"] == "server_error" and events[-1][1]["index"] == 1


async def test_not_ready_and_draining_are_503():
    engine = FakeEngine()
    app = create_app(S(), engine=engine)
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        # lifespan not started: the engine is not ready
        assert_error(await c.get("/readyz"), 503, "not_ready")
        assert_error(await c.post("/v1/generate", json={"class_label": 1}), 503, "not_ready")
        assert (await c.get("/healthz")).status_code == 200
        async with app.router.lifespan_context(app):
            assert (await c.get("/readyz")).status_code == 200
            await app.state.runtime.drain(timeout=1)
            r = await c.get("/readyz")
            assert_error(r, 503, "draining")
            assert "retry-after" in r.headers
            assert_error(await c.post("/v1/generate", json={"class_label": 1}), 503, "draining")


async def test_load_failure_reported():
    # a model config the engine cannot build fails loading in the engine process: healthz and readyz say so (the
    # CLI then exits 2: a setting to fix)
    app = create_app(S(gpt_config='{"dim": 64, "colour": 1}', device="cpu"))
    import httpx

    async with app.router.lifespan_context(app):
        for _ in range(3000):
            if app.state.runtime.load_error:
                break
            await asyncio.sleep(0.01)
        assert "colour" in app.state.runtime.load_error
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert_error(await c.get("/healthz"), 503, "load_failed")
            assert_error(await c.get("/readyz"), 503, "load_failed")


async def test_text_model_prompts():
    async with fake_client(model_type="t2i") as (c, _):
        r = await c.post("/v1/generate", json={"prompt": "a red fox", "n": 2, "seed": 1})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert_error(await c.post("/v1/generate", json={"class_label": 1}), 422, "invalid_request", "class_label")


async def test_client_disconnect_cancels_images():
    """Drive the ASGI app by hand: the client hangs up while its 4 images are being generated."""
    engine = FakeEngine(step_s=0.02, tokens=64)
    app = create_app(S(), engine=engine)
    body = json.dumps({"class_label": 1, "n": 4}).encode()
    sent: list[dict] = []
    calls, hang_up_at = 0, 0.0

    async def receive():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        if asyncio.get_running_loop().time() < hang_up_at:
            await asyncio.sleep(3600)  # like uvicorn: nothing to receive until the client goes away
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/generate",
        "raw_path": b"/v1/generate",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    async with app.router.lifespan_context(app):
        hang_up_at = asyncio.get_running_loop().time() + 0.1
        await asyncio.wait_for(app(scope, receive, send), 5)
        await asyncio.sleep(0.1)
        assert engine.by_status == {"cancelled": 4}
        assert not engine.running and not engine.waiting
        metrics = app.state.runtime.metrics.render().decode()
        assert 'adsa_requests_total{status="cancelled"} 4.0' in metrics


async def test_metrics_exposition():
    async with fake_client() as (c, _):
        await c.post("/v1/generate", json={"class_labels": [1, 2, 3], "stream": True, "preview_every_rows": 1})
        await c.get("/nope")
        text = (await c.get("/metrics")).text
        assert 'adsa_http_requests_total{route="/v1/generate",status="200"} 1.0' in text
        assert 'adsa_http_requests_total{route="unmatched",status="404"} 1.0' in text
        assert "adsa_time_to_first_preview_seconds_count 3.0" in text
        assert "adsa_batch_size_count" in text and "adsa_decode_step_seconds_count" in text
        assert "_created" not in text
        # Prometheus's default collectors, the engine's swap-outs, the model and cache-configuration info
        assert "\nprocess_cpu_seconds_total " in text and "\npython_gc_objects_collected_total{" in text
        assert "\nadsa_num_preemptions_total 2.0" in text  # the fake engine reports 2 swap-outs
        assert 'adsa_model_info{image_size="64",model="fake-demo",model_type="c2i"} 1.0' in text
        assert (
            'adsa_cache_config_info{budget="8",kv_cache_dtype="float32",max_batch_size="8",model="fake-demo",'
            'policy="adsa",pool_bytes="65536"} 1.0'
        ) in text


def http_counts(text: str) -> dict[tuple[str, str], float]:
    """{(route, status): count} of adsa_http_requests_total in one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "adsa_http_requests_total"
    }


async def test_route_label_for_every_way_of_sending_a_request():
    """The label is the route template whatever the client sends: with or without a Content-Type
    (curl -d sends a form type, which the body middleware rewrites), refused before the router
    (413), a wrong method (405), FastAPI's own pages; only unknown paths are "unmatched"."""
    body = b'{"class_label": 3}'
    async with fake_client(S(max_body_bytes=2048)) as (c, _):
        sent = [
            await c.post("/v1/generate", json={"class_label": 3}),
            await c.post("/v1/generate", content=body),  # no Content-Type at all
            await c.post("/v1/generate", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}),
            await c.post("/v1/generate", content=body, headers={"Content-Type": "application/json; charset=utf-8"}),
            await c.post("/generate", content=body),
            await c.post("/v1/generate", content=b" " * 4096),  # 413 from the body limit, before routing
            await c.get("/v1/generate"),
            await c.get("/v1/models/other"),
            await c.get("/docs"),
            await c.get("/openapi.json"),
            await c.get("/redoc"),
            await c.get("/nope"),
        ]
        assert [r.status_code for r in sent] == [200, 200, 200, 200, 200, 413, 405, 404, 200, 200, 200, 404]
        counts = http_counts((await c.get("/metrics")).text)
    assert counts == {
        ("/v1/generate", "200"): 4,
        ("/generate", "200"): 1,
        ("/v1/generate", "413"): 1,
        ("/v1/generate", "405"): 1,
        ("/v1/models/{model_id}", "404"): 1,
        ("/docs", "200"): 1,
        ("/openapi.json", "200"): 1,
        ("/redoc", "200"): 1,
        ("unmatched", "404"): 1,
    }


def test_error_mapping_table():
    from adsa_core.engine.request import (
        DeadlineExceeded,
        EngineDraining,
        InvalidRequest,
        QueueFull,
        RequestCancelled,
        RequestFailed,
    )

    cases = [
        (InvalidRequest("x"), 422),
        (QueueFull("x"), 429),
        (EngineDraining("x"), 503),
        (DeadlineExceeded("x"), 504),
        (RequestFailed("x"), 500),
        (RequestCancelled("x"), 499),
        (RuntimeError("boom"), 500),
    ]
    for exc, status in cases:
        err = to_api_error(exc, retry_after_s=2.5)
        assert err.status == status
    assert to_api_error(QueueFull("x"), 2.5).headers["Retry-After"] == "3"
    assert to_api_error(RuntimeError("secret detail")).message == "internal server error"


async def test_cors_when_configured():
    async with fake_client(S(cors_origins="https://ui.example")) as (c, _):
        r = await c.options(
            "/v1/generate", headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
        )
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
        # a refused preflight is an error like any other: the API's body, not Starlette's text
        refused = await c.options(
            "/v1/generate", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"}
        )
        assert_error(refused, 400, "cors_refused")
        assert refused.json()["error"]["message"] == ("CORS preflight refused: origin, method not allowed "
                                                      "(ADSA_CORS_ORIGINS lists the allowed origins; the API takes "
                                                      "GET, POST)")
        refused = await c.options(  # an allowed origin: the hint is about the method alone
            "/v1/generate", headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "PUT"}
        )
        message = refused.json()["error"]["message"]
        assert message == "CORS preflight refused: method not allowed (the API takes GET, POST)"
    # answers from before the router (a missing key, a body too large, not JSON) carry the headers too: a page
    # on that origin can read why
    async with fake_client(S(cors_origins="https://ui.example", api_keys=["k"], max_body_bytes=1024)) as (c, _):
        origin = {"Origin": "https://ui.example"}
        answers = [await c.post("/v1/generate", json={"class_label": 1}, headers=origin),
                   await c.post("/v1/generate", content=b"{}", headers={**origin, "Authorization": "Bearer k",
                                                                        "Content-Type": "application/xml"}),
                   await c.post("/v1/generate", json={"prompt": "x" * 2048},
                                headers={**origin, "Authorization": "Bearer k"})]
        assert [r.status_code for r in answers] == [401, 415, 413]
        assert all(r.headers["access-control-allow-origin"] == "https://ui.example" for r in answers)
        # the official OpenAI JS SDK's own headers pass the preflight
        pre = await c.options("/v1/images/generations", headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang,x-stainless-retry-count"})
        assert pre.status_code == 200 and "x-stainless-lang" in pre.headers["access-control-allow-headers"].lower()
    async with fake_client() as (c, _):  # off by default
        r = await c.get("/healthz", headers={"Origin": "https://ui.example"})
        assert "access-control-allow-origin" not in r.headers


async def test_playground_page_and_its_files_are_open():
    """GET / and every file it references (and their module imports) load without a key; the page is not
    an API route, and its files count under one metrics route, not one series per path."""
    async with fake_client(S(api_keys=["k"])) as (c, _):
        page = await c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        pending = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
        assert "/static/playground.js" in pending and "/static/playground.css" in pending
        seen = set()
        while pending:
            path = pending.pop()
            seen.add(path)
            r = await c.get(path)
            assert r.status_code == 200, path
            base = path.rsplit("/", 1)[0]
            pending += [f"{base}/{m.removeprefix('./')}" for m in re.findall(r"from '(\./[^']+)'", r.text)]
        assert "/static/vendor/eventsource-parser/parse.js" in seen
        for path in ("/", "/static/playground.js"):  # a browser's revalidation: 304, no body
            etag = (await c.get(path)).headers["etag"]
            again = await c.get(path, headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b"", path
        assert (await c.get("/static/imagenet_classes.json")).json()[207] == "golden retriever"
        assert_error(await c.get("/static/missing.js"), 404, "not_found")
        assert (await c.get("/static/..%2Froutes%2Fplayground.py")).status_code == 404  # nothing outside static/
        assert "/" not in (await c.get("/openapi.json")).json()["paths"]
        metrics = (await c.get("/metrics")).text
        assert 'adsa_http_requests_total{route="/",status="200"}' in metrics
        assert set(re.findall(r'route="(/static[^"]*)",status="(\d+)"', metrics)) == {
            ("/static/{path:path}", "200"),
            ("/static/{path:path}", "304"),
            ("/static/{path:path}", "404"),
        }


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),  # every interface: this machine reaches it on loopback
        ("::", "http://[::1]:8000"),
        ("fd00::5", "http://[fd00::5]:8000"),
        ("node-3.internal", "http://node-3.internal:8000"),
    ],
)
def test_ready_url_for_each_bind_address(host, url):
    assert create_app(S(host=host, port=8000), engine=FakeEngine()).state.runtime.url() == url


async def test_ready_url_has_the_bound_port_when_the_os_picks_it():
    """ADSA_PORT=0: the ready line must name the port the OS chose, where the server really answers."""
    import httpx
    import uvicorn

    from server.__main__ import DrainingServer

    app = create_app(S(port=0), engine=FakeEngine())
    runtime = app.state.runtime
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning")
    server = DrainingServer(config, runtime, drain_timeout_s=1)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), task
            await asyncio.sleep(0.01)
        host, port = runtime.address
        assert port != 0 and runtime.url() == f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as c:
            assert (await c.get(runtime.url() + "/readyz")).json() == {"status": "ready"}
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("accept, png", [
    ("image/png", True),
    ("IMAGE/PNG", True),  # media types are case-insensitive
    ("application/json, image/png", False),  # equal weights: the first listed
    ("image/png, application/json", True),
    ("application/json;q=0.1, image/png", True),  # weights decide before order
    ("image/png;q=0.5, application/json", False),
    ("image/png; q=0", False),  # q=0: not acceptable
    ("image/*", True),
    ("image/*;q=0.9, application/json;q=0.8", True),
    ("image/png;q=0.2, image/*;q=1", True),  # the most specific range speaks for image/png: 0.2 > JSON's 0
    ("*/*", False),  # both acceptable, the same range: JSON, the default
    ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8", False),  # a browser
    ("image/png;q=nan, application/json;q=0.1", False),
    ("image/png;q=abc", False),
    ("text/plain", False),
])
async def test_accept_header_picks_png_by_weight_then_order(accept, png):
    async with fake_client() as (c, _):
        r = await c.post("/v1/generate", json={"class_label": 1}, headers={"Accept": accept})
        assert r.status_code == 200
        assert r.headers["content-type"] == ("image/png" if png else "application/json"), accept
        assert r.content.startswith(b"\x89PNG") == png


async def test_a_server_without_a_decoder_refuses_image_formats_before_any_work():
    async with fake_client(decoder=False) as (c, engine):
        for path, body, param in [("/v1/generate", {"class_label": 1, "response_format": "png"}, "response_format"),
                                  ("/v1/generate", {"class_label": 1, "response_format": "b64_json"},
                                   "response_format"),
                                  ("/v1/images/generations", {"prompt": "class1"}, None)]:  # it names no format
            r = await c.post(path, json=body)
            assert r.status_code == 501, r.text
            err = r.json()["error"]
            assert err["code"] == "no_decoder" and "token ids" in err["message"] and err["param"] == param, err
        schema = (await c.get("/openapi.json")).json()["paths"]  # clients generated from the schema expect it
        assert all("501" in schema[path]["post"]["responses"] for path in ("/v1/generate", "/v1/images/generations"))
        assert engine.submitted == 0  # refused before the engine saw a request
        # without a format: token ids, as API.md says; Accept: image/png cannot be met, so JSON
        for headers in ({}, {"Accept": "image/png"}):
            r = await c.post("/v1/generate", json={"class_label": 1}, headers=headers)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            image = r.json()["data"][0]
            assert image["b64_json"] is None and len(image["tokens"]) == 16
