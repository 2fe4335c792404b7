"""Property-based fuzz of the OpenAPI schema: schemathesis generates valid and invalid requests for every
operation; the app (in-process, FakeEngine) must never answer with a server error, and every error must
carry the API's `{"error", "type"}` body."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from server_fake_engine import FakeEngine
from starlette.testclient import TestClient

from server import Settings, create_app
from server.schemas import GenerateResponse

schemathesis = pytest.importorskip("schemathesis")

_app = create_app(Settings(_env_file=None, max_body_bytes=64 * 1024), engine=FakeEngine(step_s=0.001))
_schema = schemathesis.openapi.from_dict(_app.openapi())
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
        err = r.json()
        assert set(err) == {"error", "type"} and isinstance(err["error"], str), err
    elif case.path == "/v1/generate" and r.headers["content-type"] == "application/json":
        GenerateResponse.model_validate(r.json())
