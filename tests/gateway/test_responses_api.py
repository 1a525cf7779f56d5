"""``/v1/responses`` per tenant on the fake engine: the caller's adapters, quotas and metering
as for chat, and stored responses that only their tenant can read or continue from."""

from __future__ import annotations

import json

import pytest

from adapters_registry import TenantLimits
from tests.gateway.conftest import Gateway
from tests.gateway.test_chat_api import assert_envelope
from tests.gateway.test_quotas import metric


def create(gw: Gateway, tenant: str, model: str | None = "support-bot", **body):
    if model is not None:
        body["model"] = model
    body.setdefault("input", "Who are you?")
    return gw.client.post("/v1/responses", json=body, headers=gw.headers(tenant))


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_a_tenant_gets_its_adapter_with_the_tier_and_usage_counted(gw: Gateway) -> None:
    r = create(gw, "acme")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("resp_") and body["model"] == "support-bot"
    assert body["output"][0]["content"][0]["text"] == "acme/support-bot@v1 says hello world"
    assert r.headers["x-lora-gateway-adapter-tier"] == "remote_fetch"
    assert metric(gw, "lgw_requests_total", tenant="acme", status="200") == 1
    assert metric(gw, "lgw_completion_tokens_total", tenant="acme") == 4
    base = create(gw, "acme", model=None)
    assert base.status_code == 200 and base.headers["x-lora-gateway-adapter-tier"] == "base"


def test_a_stream_is_responses_events_without_done(gw: Gateway) -> None:
    r = create(gw, "acme", stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    assert [kind for kind, _ in got] == ["response.created"] + ["response.output_text.delta"] * 4 + [
        "response.completed"]
    assert "[DONE]" not in r.text


def test_a_stored_response_is_its_tenants_alone(gw: Gateway) -> None:
    mine = create(gw, "acme").json()["id"]
    got = gw.client.get(f"/v1/responses/{mine}", headers=gw.headers("acme"))
    assert got.status_code == 200 and got.json()["id"] == mine
    follow = create(gw, "acme", previous_response_id=mine)
    assert follow.status_code == 200 and follow.json()["previous_response_id"] == mine
    # Another tenant: every way in is the 404 a made-up id gets, word for word.
    for rid in (mine, "resp_made_up"):
        theirs = assert_envelope(gw.client.get(f"/v1/responses/{rid}", headers=gw.headers("globex")),
                                 404, "invalid_request_error", "response_not_found")
        assert theirs["message"] == f"Response with id '{rid}' not found."
        cont = assert_envelope(create(gw, "globex", "pirate", previous_response_id=rid), 404,
                               "invalid_request_error", "response_not_found")
        assert cont == theirs
        assert_envelope(gw.client.post(f"/v1/responses/{rid}/cancel", headers=gw.headers("globex")),
                        404, "invalid_request_error", "response_not_found")
    # Its own tenant may cancel only what vLLM lets it (background responses, none here).
    assert_envelope(gw.client.post(f"/v1/responses/{mine}/cancel", headers=gw.headers("acme")),
                    400, "invalid_request_error")


def test_store_false_keeps_nothing(gw: Gateway) -> None:
    rid = create(gw, "acme", store=False).json()["id"]
    assert_envelope(gw.client.get(f"/v1/responses/{rid}", headers=gw.headers("acme")), 404,
                    "invalid_request_error", "response_not_found")


def test_the_oldest_stored_responses_are_forgotten_past_the_bound(gateway_factory) -> None:
    gw = gateway_factory(stored_responses=2)
    ids = [create(gw, "acme").json()["id"] for _ in range(3)]
    assert set(gw.engine.serving.stored) == set(ids[1:]), "the layer forgot the oldest"
    codes = [gw.client.get(f"/v1/responses/{rid}", headers=gw.headers("acme")).status_code
             for rid in ids]
    assert codes == [404, 200, 200]


def test_with_no_store_configured_nothing_is_kept(gateway_factory) -> None:
    gw = gateway_factory(stored_responses=0)
    rid = create(gw, "acme").json()["id"]
    assert gw.client.get(f"/v1/responses/{rid}", headers=gw.headers("acme")).status_code == 404


@pytest.mark.parametrize("body,param", [
    ({"background": True}, "background"),
    ({"request_id": "resp_mine"}, "request_id"),
    ({"priority": -5}, "priority"),
    ({"previous_input_messages": []}, "previous_input_messages"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input"),
    ({"temperature": 2.5}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_bodies_are_400_naming_the_parameter(gw: Gateway, body: dict, param: str) -> None:
    err = assert_envelope(create(gw, "acme", **body), 400, "invalid_request_error")
    assert err["param"] == param, err


def test_other_tenants_adapter_is_404(gw: Gateway) -> None:
    assert_envelope(create(gw, "acme", "pirate"), 404, "invalid_request_error", "model_not_found")


def test_tools_need_a_tool_parser(gw: Gateway) -> None:
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    err = assert_envelope(create(gw, "acme", tools=[tool]), 400, "invalid_request_error")
    assert err["param"] == "tools"


def test_the_keys_max_tokens_ceiling_is_max_output_tokens_here(gw: Gateway) -> None:
    gw.env.registry.set_limits("acme", TenantLimits(max_tokens=2))  # type: ignore[attr-defined]
    err = assert_envelope(create(gw, "acme", max_output_tokens=3), 400, "invalid_request_error")
    assert err["param"] == "max_output_tokens"
    r = create(gw, "acme")
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == "acme/support-bot@v1 says", \
        "no ask gets the ceiling"


def test_an_error_mid_stream_is_a_responses_error_event(gw: Gateway) -> None:
    gw.engine.serving.die_mid_stream = False
    calls = []

    async def die() -> None:
        calls.append(1)
        gw.engine.serving.die_mid_stream = True

    gw.engine.serving.after_first_content = die
    r = create(gw, "acme", stream=True)
    assert r.status_code == 200
    got = events(r.text)
    kind, last = got[-1]
    assert kind == "error" and last["type"] == "error" and last["code"], last
    assert last["sequence_number"] == len(got) - 1
    assert "[DONE]" not in r.text
