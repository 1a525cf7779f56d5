"""Schemathesis against the live gateway (uvicorn in a thread, fake engine, real registry):
every documented operation, positive and negative cases, as a tenant and as the admin.

0 server errors, and every answer's status, content type and body as /openapi.json
documents them. ``model`` is restricted to the tenant's real names so cases get past 404.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from gateway.app import create_app
from tests.gateway.conftest import make_settings, serving
from tests.gateway.fakes import FakeEngine

ADMIN_KEY = "s" * 40
# Per operation and mode (27 operations): ~20 s on a busy 2-core machine; more for a deeper run.
EXAMPLES = int(os.environ.get("LGW_SCHEMATHESIS_EXAMPLES", "6"))
CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance,
          checks.response_headers_conformance]


def restrict_model(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Cases name only ``names`` as ``model`` (the request bodies are the schema's own)."""
    schemas = doc["components"]["schemas"]
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        assert "model" in schemas[request]["properties"], request
        schemas[request]["properties"]["model"] = {"type": "string", "enum": names}
    return doc


def fuzz(operation: Any, mode: GenerationMode, url: str, session: requests.Session,
         headers: dict[str, str]) -> tuple[int, list[str]]:
    """Up to EXAMPLES cases of one operation: how many ran, and every failed check described
    (collected, not raised: no shrinking, and one run reports every operation's failures)."""
    failures: list[str] = []
    calls = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        try:
            case.call_and_validate(base_url=url, session=session, checks=CHECKS, headers=headers)
        except Exception as exc:
            failures.append(f"{operation.label} ({mode}): {exc}")

    try:
        run()
    except Unsatisfiable:
        # Nothing to break: every value of the operation's inputs is valid (e.g. a path
        # parameter that is any string); positive cases cover it.
        assert mode is GenerationMode.NEGATIVE, f"no cases for {operation.label}"
    return calls, failures


def test_no_server_errors_and_answers_as_documented(registry_env, tmp_path) -> None:
    started = time.monotonic()
    app = create_app(make_settings(registry_env, tmp_path, admin_api_key=ADMIN_KEY),
                     engine_factory=lambda _s: FakeEngine())
    with serving(app) as url:
        doc = httpx.get(f"{url}/openapi.json").json()
        tenant_key = registry_env.keys["acme"]
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {tenant_key}"})
        names = [card["id"] for card in models.json()["data"]]
        assert "support-bot" in names and "support-bot@v1" in names
        schema = schemathesis.openapi.from_dict(restrict_model(doc, names))
        session = requests.Session()
        failures: list[str] = []
        calls = 0
        operations = sorted((op.ok() for op in schema.get_all_operations()),
                            key=lambda op: op.path.startswith("/admin"))  # tenants' first
        assert len(operations) > 20
        for operation in operations:
            key = ADMIN_KEY if operation.path.startswith("/admin/") else tenant_key
            spec = doc["paths"][operation.path][operation.method.lower()]
            has_input = "parameters" in spec or "requestBody" in spec
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:2 if has_input else 1]:
                ran, failed = fuzz(operation, mode, url, session, {"Authorization": f"Bearer {key}"})
                calls += ran
                failures += failed
    assert not failures, "\n\n".join(failures[:10]) + f"\n\n{len(failures)} failure(s)"
    assert calls > 3 * len(operations)
    if EXAMPLES <= 6:  # the CI budget
        assert time.monotonic() - started < 60, time.monotonic() - started


def test_a_message_without_a_role_is_a_400(gw) -> None:
    """Found by the run above: vLLM's schema takes openai-harmony's ``Message`` (``author``,
    no ``role``), which the chat path cannot render (a 500)."""
    body = {"model": "support-bot", "messages": [{"author": {"role": "user"}, "content": []}]}
    r = gw.client.post("/v1/chat/completions", json=body, headers=gw.headers("acme"))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"


def test_durations_past_the_calendar_are_a_400(gateway_factory) -> None:
    """Found by the run above: a huge grace or key lifetime overflowed timedelta (a 500)."""
    gw = gateway_factory(admin_api_key=ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for path, body in (("/admin/v1/gc", {"grace_minutes": 1e20, "dry_run": True}),
                       ("/admin/v1/tenants/acme/keys", {"expires_in_days": 1e12})):
        r = gw.client.post(path, json=body, headers=admin)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] in ("grace_minutes", "expires_in_days")
