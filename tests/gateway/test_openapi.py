"""/openapi.json tells the truth: the statuses each route answers, in OpenAI's error envelope,
the SSE answer of the inference routes, and nothing the API port does not serve."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.api.admin import router as admin_router
from gateway.api.routes import TIER_HEADER
from gateway.app import create_app
from gateway.config import GatewaySettings
from tests.gateway.conftest import Gateway

ENVELOPE = {"$ref": "#/components/schemas/ErrorResponse"}
INFERENCE = ("/v1/chat/completions", "/v1/completions")
ADMIN_KEY = "a" * 40


def document(tmp_path, **overrides: Any) -> dict[str, Any]:
    """The document as a client loads it (no lifespan needed to serve it)."""
    settings = GatewaySettings(database_url=f"sqlite:///{tmp_path / 'r.db'}",
                               artifacts_dir=str(tmp_path / "a"), cache_dir=tmp_path / "c",
                               base_model_id="base", base_model_dir=tmp_path / "b", **overrides)
    r = TestClient(create_app(settings)).get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def operations(doc: dict[str, Any]):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def test_inference_routes_document_what_they_answer(tmp_path) -> None:
    doc = document(tmp_path)
    for path in INFERENCE:
        answers = doc["paths"][path]["post"]["responses"]
        assert set(answers) == {"200", "400", "401", "404", "413", "429", "503"}, path
        assert set(answers["200"]["content"]) == {"application/json", "text/event-stream"}
        assert answers["200"]["headers"][TIER_HEADER]["required"] is True
        for status in ("400", "401", "404", "413", "429", "503"):
            assert answers[status]["content"]["application/json"]["schema"] == ENVELOPE, status
        assert "Retry-After" in answers["429"]["headers"] and "Retry-After" in answers["503"]["headers"]
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    assert set(doc["paths"]["/v1/models"]["get"]["responses"]) == {"200", "401", "503"}


def test_no_422_and_no_fastapi_validation_schema(tmp_path) -> None:
    doc = document(tmp_path, admin_api_key=ADMIN_KEY)
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    with_422 = [(path, method) for path, method, op in operations(doc) if "422" in op["responses"]]
    # The one route that does answer 422: an uploaded adapter failing the compatibility check.
    assert with_422 == [("/admin/v1/tenants/{tenant}/adapters/{name}/versions", "post")]
    upload = doc["paths"][with_422[0][0]]["post"]
    assert upload["responses"]["422"]["content"]["application/json"]["schema"] == ENVELOPE
    assert "application/octet-stream" in upload["requestBody"]["content"]


def test_admin_routes_documented_only_when_enabled(tmp_path) -> None:
    assert not [p for p in document(tmp_path)["paths"] if p.startswith("/admin")]
    enabled = document(tmp_path, admin_api_key=ADMIN_KEY)
    admin = [(p, m, op) for p, m, op in operations(enabled) if p.startswith("/admin/v1/")]
    assert len(admin) == sum(len(route.methods) for route in admin_router.routes)  # all of them
    for path, method, op in admin:
        assert {"401", "404", "503"} <= set(op["responses"]), (method, path)
        has_input = "parameters" in op or "requestBody" in op
        assert ("400" in op["responses"]) == has_input, (method, path)


def test_metrics_documented_only_on_the_port_that_serves_it(tmp_path) -> None:
    assert "/metrics" in document(tmp_path)["paths"]
    assert "/metrics" not in document(tmp_path, metrics_port=9100)["paths"]


@pytest.mark.parametrize("body", [{"model": "support-bot"}, {"model": 1, "messages": []},
                                  {"model": "support-bot", "messages": [], "max_tokens": "10"}])
def test_a_validation_error_is_the_documented_400(gw: Gateway, body: dict[str, Any]) -> None:
    r = gw.client.post("/v1/chat/completions", json=body, headers=gw.headers("acme"))
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_every_admin_answer_has_a_documented_body(tmp_path) -> None:
    doc = document(tmp_path, admin_api_key=ADMIN_KEY)
    schemas = doc["components"]["schemas"]
    for path, method, op in operations(doc):
        if not path.startswith("/admin/v1/"):
            continue
        ok = next(status for status in op["responses"] if status.startswith("2"))
        schema = op["responses"][ok]["content"]["application/json"]["schema"]
        name = schema["$ref"].rsplit("/", 1)[-1]
        assert schemas[name].get("properties"), (method, path, name)  # a body, not "any object"
    limits = schemas["Limits"]["properties"]
    assert set(limits) == {"rpm", "tpm", "concurrency", "max_tokens", "max_prompt_tokens", "weight",
                           "max_file_bytes", "max_running_jobs", "max_queued_jobs", "max_training_tokens"}
