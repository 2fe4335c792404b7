"""Property-based fuzz of the OpenAPI schema: schemathesis generates valid and invalid requests for every
operation; the app (in-process, FakeEngine) must never answer with a server error, every error must
carry OpenAI's `{"error": {"message", "type", "param", "code"}}` body, and a body the schema accepts
is never refused for the one-of rule (class_label, class_labels, prompt) the schema states."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from server_fake_engine import FakeEngine
from starlette.testclient import TestClient

from server import Settings, create_app
from server.schemas import GenerateRequest, GenerateResponse

schemathesis = pytest.importorskip("schemathesis")

_app = create_app(Settings(_env_file=None, max_body_bytes=64 * 1024), engine=FakeEngine(step_s=0.001))
_schema = schemathesis.openapi.from_dict(_app.openapi())
_generate_schema = Draft202012Validator(GenerateRequest.model_json_schema())
_cases = st.one_of(
    _schema.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
    _schema.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
)


@pytest.fixture(scope="module")
def client():
    with TestClient(_app, raise_server_exceptions=False) as c:  # one event loop + lifespan for all cases
        yield c


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_cases)
def test_no_server_errors(client, case):
    kw = case.as_transport_kwargs(base_url="http://testserver")
    kw.pop("cookies", None)
    if isinstance(kw.get("data"), bytes | str):  # raw (possibly invalid) bodies
        kw["content"] = kw.pop("data")
    try:
        r = client.request(**kw)
    except (UnicodeEncodeError, ValueError, TypeError):
        reject()  # header values or bodies that no HTTP client can send; not a server question
    body = case.body if isinstance(case.body, dict) else {}
    # a deadline the client itself asked to be tiny may legitimately expire (504)
    allowed_504 = r.status_code == 504 and isinstance(body.get("timeout_s"), int | float)
    assert r.status_code < 500 or allowed_504, (r.status_code, r.text[:500], kw)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
        if case.path == "/v1/generate" and _generate_schema.is_valid(case.body):
            assert "exactly one of" not in err["message"], (case.body, err)
    elif case.path == "/v1/generate" and r.headers["content-type"] == "application/json":
        GenerateResponse.model_validate(r.json())


def test_schema_states_exactly_one_condition():
    """`{}` is schema-invalid (it used to pass the schema and get a 422); null counts as not given."""
    spec = _app.openapi()["components"]["schemas"]["GenerateRequest"]
    assert len(spec["oneOf"]) == 3
    valid = [{"class_label": 1}, {"class_labels": [1, 2]}, {"prompt": "x"}, {"class_label": None, "prompt": "x"}]
    invalid = [{}, {"class_label": 1, "prompt": "x"}, {"class_label": None}, {"class_labels": [1], "class_label": 2}]
    assert all(_generate_schema.is_valid(b) for b in valid)
    assert not any(_generate_schema.is_valid(b) for b in invalid)
