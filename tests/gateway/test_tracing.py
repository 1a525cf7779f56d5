"""Traces: one per inference request, its stages as spans, the caller's ``traceparent``
continued and handed on to the engine; nothing recorded while tracing is off, and no prompt
text or key in any span. (The real engine's own span and a real OTLP receiver:
tests/integration/test_tracing.py.)"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import create_app
from gateway.observability.tracing import (
    Tracing,
    TracingConfigError,
    enabled_by,
    engine_traces_endpoint,
)
from tests.gateway.conftest import make_settings
from tests.gateway.fakes import FakeEngine

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
PROMPT = "xyzzy-secret-prompt tell me"
STAGES = ["auth", "quota", "admission", "resolve", "adapter.acquire",
          "engine.time_to_first_token", "engine.stream"]


@pytest.fixture
def traced(registry_env, tmp_path):
    exporter = InMemorySpanExporter()
    engine = FakeEngine()
    app = create_app(make_settings(registry_env, tmp_path), engine_factory=lambda _s: engine,
                     tracing=Tracing(exporter, batch=False))
    with TestClient(app) as client:
        yield client, exporter, engine, registry_env.keys


def _chat(client, key, **extra):
    body = {"model": "support-bot", "messages": [{"role": "user", "content": PROMPT}], **extra}
    return client.post("/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}",
                                "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})


def test_a_streamed_request_is_one_trace_of_its_stages_continuing_the_callers(traced):
    client, exporter, engine, keys = traced
    r = _chat(client, keys["acme"], stream=True)
    assert r.status_code == 200
    text = r.text
    assert text.rstrip().endswith("data: [DONE]")
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.parent is None or s.name.startswith("POST"))
    assert root.name == "POST /v1/chat/completions"
    # The caller's trace goes on: same trace id, the caller's span as the parent.
    assert format(root.context.trace_id, "032x") == CALLER_TRACE
    assert root.parent is not None and format(root.parent.span_id, "016x") == CALLER_SPAN
    children = [s for s in spans if s is not root]
    assert sorted(s.name for s in children) == sorted(STAGES)
    for span in children:
        assert span.parent.span_id == root.context.span_id, span.name
        assert span.context.trace_id == root.context.trace_id
        assert span.end_time >= span.start_time
    by_name = {s.name: s for s in children}
    assert by_name["adapter.acquire"].attributes["lgw.adapter.tier"] in (
        "slot_hit", "engine_hit", "disk_hit", "remote_fetch")
    first, stream = by_name["engine.time_to_first_token"], by_name["engine.stream"]
    assert first.end_time == stream.start_time
    assert stream.attributes["gen_ai.usage.output_tokens"] > 0
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["lgw.tenant"] == "acme"
    assert root.attributes["lgw.model"] == "acme/support-bot"
    assert root.attributes["gen_ai.usage.output_tokens"] == stream.attributes["gen_ai.usage.output_tokens"]
    # The engine got the engine span's context, as vLLM takes it (its ``trace_headers``).
    headers = engine.serving.routes[-1].trace_headers
    assert headers["traceparent"] == f"00-{CALLER_TRACE}-{first.context.span_id:016x}-01"
    # Names, counts and statuses only: no prompt, no answer, no key anywhere.
    recorded = json.dumps([dict(s.attributes) for s in spans] + [s.name for s in spans])
    assert "xyzzy" not in recorded and keys["acme"] not in recorded
    assert "Bearer" not in recorded


def test_a_refusal_is_traced_with_the_stage_that_refused_it(traced):
    client, exporter, _, keys = traced
    assert _chat(client, "not-a-key").status_code == 401
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/chat/completions", "auth"}
    assert spans["auth"].attributes["error.type"] == "AuthenticationFailedError"
    assert spans["POST /v1/chat/completions"].attributes["http.response.status_code"] == 401
    exporter.clear()
    body = {"model": "no-such-adapter", "messages": [{"role": "user", "content": PROMPT}]}
    r = client.post("/v1/chat/completions", json=body,
                    headers={"Authorization": f"Bearer {keys['acme']}"})
    assert r.status_code == 404
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/chat/completions", "auth", "quota", "admission", "resolve"}
    assert spans["resolve"].attributes["error.type"] == "ModelNotFoundError"
    assert spans["POST /v1/chat/completions"].parent is None  # no traceparent: a new trace


def test_probes_listings_and_admin_are_not_traced(traced):
    client, exporter, _, keys = traced
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {keys['acme']}"}).status_code == 200
    assert exporter.get_finished_spans() == ()


def test_off_by_default_nothing_goes_to_the_engine(gw):
    assert gw.chat("acme", "support-bot").status_code == 200
    assert gw.engine.serving.routes[-1].trace_headers is None
    assert not Tracing.from_env({}).enabled


@pytest.mark.parametrize(("environ", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
])
def test_the_standard_variables_turn_it_on(environ, on):
    assert enabled_by(environ) is on
    assert Tracing.from_env(environ).enabled is on


def test_the_engine_traces_to_the_same_endpoint():
    assert engine_traces_endpoint({}) is None
    assert engine_traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == (
        "http://c:4318/v1/traces", "http/protobuf")
    assert engine_traces_endpoint({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/x"}) == (
        "http://c:9/x", "http/protobuf")
    assert engine_traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                                   "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == ("http://c:4317", "grpc")
    assert engine_traces_endpoint({"OTEL_TRACES_EXPORTER": "console"}) is None


@pytest.mark.parametrize("environ", [
    {"OTEL_TRACES_EXPORTER": "zipkin"},
    {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
])
def test_what_it_cannot_export_is_refused_by_name(environ):
    with pytest.raises(TracingConfigError, match=r"zipkin|http/json"):
        Tracing.from_env(environ)
