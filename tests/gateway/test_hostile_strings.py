"""Arbitrary Unicode, lone surrogates included, in any string field of a chat request is
never a 5xx (issue 10: a lone surrogate in content was a 500 from the renderer)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.conftest import Gateway

SURROGATES = st.sampled_from(["\ud800", "\udfff", "\ud83d", "\udc00"])
HOSTILE = st.lists(st.one_of(st.characters(), SURROGATES), max_size=12).map("".join)


def _bodies(text: str) -> list[dict]:
    msg = [{"role": "user", "content": "hi"}]
    return [
        {"model": text, "messages": msg},
        {"model": "support-bot", "messages": [{"role": "user", "content": text}]},
        {"model": "support-bot", "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]},
        {"model": "support-bot", "messages": [{"role": "system", "content": text}, *msg]},
        {"model": "support-bot", "messages": [{"role": "user", "content": "hi", "name": text}]},
        {"model": "support-bot", "messages": msg, "stop": text or "x"},
        {"model": "support-bot", "messages": msg, "stop": [text or "x"]},
        {"model": "support-bot", "messages": msg, "user": text},
        {"model": "support-bot", "messages": msg, "stream": True, "stop": text or "x"},
    ]




@given(text=HOSTILE)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_string_field_yields_a_server_error(gw: Gateway, text: str) -> None:
    for body in _bodies(text):
        # json.dumps escapes surrogates (\\ud800), as every JSON client sends them.
        r = gw.client.post("/v1/chat/completions", content=json.dumps(body),
                           headers={**gw.headers("acme"), "content-type": "application/json"})
        assert r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_lone_surrogate_in_content_is_a_400(gw: Gateway) -> None:
    body = {"model": "support-bot", "messages": [{"role": "user", "content": "bad \ud800 text"}]}
    r = gw.client.post("/v1/chat/completions", content=json.dumps(body),
                       headers={**gw.headers("acme"), "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "x-request-id" in r.headers
