"""``/tokenize`` and ``/detokenize`` per tenant: the caller's own names only, the request rate
counted, no tokens charged, no engine request; vLLM's bodies, strict."""

from __future__ import annotations

import pytest

from adapters_registry import TenantLimits
from tests.gateway.conftest import Gateway
from tests.gateway.test_chat_api import assert_envelope
from tests.gateway.test_quotas import RATE_HEADERS, assert_429, metric


def tok(gw: Gateway, tenant: str, body: dict, path: str = "/tokenize"):
    return gw.client.post(path, json=body, headers=gw.headers(tenant))


@pytest.mark.parametrize("model", ["support-bot", "support-bot:prod", "support-bot@v1",
                                   "acme/support-bot", "base", None])
def test_a_prompt_is_tokenized_for_each_of_the_callers_names(gw: Gateway, model) -> None:
    body = {"prompt": "hi!", "return_token_strs": True}
    if model is not None:  # absent: the base
        body["model"] = gw.client.app.state.services.settings.base_name if model == "base" else model
    r = tok(gw, "acme", body)
    assert r.status_code == 200, r.text
    assert r.json() == {"count": 3, "max_model_len": 512, "tokens": [104, 105, 33],
                        "token_strs": ["h", "i", "!"]}
    assert not gw.engine.add_calls, "tokenizing loads no adapter"


def test_a_chat_is_tokenized_and_detokenized(gw: Gateway) -> None:
    r = tok(gw, "acme", {"model": "support-bot", "messages": [{"role": "user", "content": "yo"}]})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    back = tok(gw, "acme", {"model": "support-bot", "tokens": tokens}, "/detokenize")
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": "<user>yo"}


@pytest.mark.parametrize("path,body", [("/tokenize", {"prompt": "x"}),
                                       ("/detokenize", {"tokens": [1]})])
@pytest.mark.parametrize("model", ["pirate", "globex/pirate", "no-such-adapter"])
def test_another_tenants_name_is_404_as_a_missing_one(gw: Gateway, path, body, model) -> None:
    err = assert_envelope(tok(gw, "acme", {**body, "model": model}, path), 404,
                          "invalid_request_error", "model_not_found")
    assert err["message"] == f"The model `{model}` does not exist or you do not have access to it."


@pytest.mark.parametrize("body,param", [
    ({"model": "support-bot"}, None),  # neither prompt nor messages
    ({"model": "support-bot", "prompt": "x", "chat_template": "{{ 1 }}"}, "chat_template"),
    ({"model": "support-bot", "messages": [{"role": "user", "content": "x"}],
      "chat_template_kwargs": {"a": 1}}, "chat_template_kwargs"),
    ({"model": "support-bot", "prompt": "x", "surprise": 1}, None),
    ({"model": "support-bot", "messages": [{"role": "wizard", "content": "x"}]},
     "messages[0].role"),
    ({"model": "support-bot", "messages": []}, "messages"),
])
def test_bad_tokenize_bodies_are_400(gw: Gateway, body, param) -> None:
    err = assert_envelope(tok(gw, "acme", body), 400, "invalid_request_error")
    if param is not None:
        assert err["param"] == param, err


def test_a_lone_surrogate_is_400(gw: Gateway) -> None:
    r = gw.client.post("/tokenize", content='{"model": "support-bot", "prompt": "x\\ud800"}',
                       headers={**gw.headers("acme"), "content-type": "application/json"})
    assert assert_envelope(r, 400, "invalid_request_error")["param"] == "prompt"


@pytest.mark.parametrize("tokens", [[-1], ["a"], [2**63], "12"])
def test_bad_detokenize_bodies_are_400(gw: Gateway, tokens) -> None:
    assert_envelope(tok(gw, "acme", {"model": "support-bot", "tokens": tokens}, "/detokenize"),
                    400, "invalid_request_error")


def test_without_the_base_served_a_model_is_required(gateway_factory) -> None:
    gw = gateway_factory(expose_base=False)
    err = assert_envelope(tok(gw, "acme", {"prompt": "x"}), 400, "invalid_request_error")
    assert err["param"] == "model"
    base = gw.client.app.state.services.settings.base_name
    assert_envelope(tok(gw, "acme", {"prompt": "x", "model": base}), 404,
                    "invalid_request_error", "model_not_found")


def test_keys_are_required(gw: Gateway) -> None:
    r = gw.client.post("/tokenize", json={"model": "support-bot", "prompt": "x"})
    assert_envelope(r, 401, "authentication_error")


def test_the_request_rate_counts_but_no_tokens_are_charged(gateway_factory) -> None:
    gw = gateway_factory()
    gw.env.registry.set_limits("acme", TenantLimits(rpm=2, tpm=5))  # type: ignore[attr-defined]
    first = tok(gw, "acme", {"model": "support-bot", "prompt": "longer than five tokens"})
    assert first.status_code == 200, first.text
    assert [first.headers[h] for h in RATE_HEADERS[:2]] == ["2", "1"]
    assert tok(gw, "acme", {"model": "support-bot", "tokens": [1, 2, 3, 4, 5, 6, 7]},
               "/detokenize").status_code == 200
    assert_429(tok(gw, "acme", {"model": "support-bot", "prompt": "x"}))
    assert metric(gw, "lgw_requests_total", tenant="acme", status="200") == 2
    assert metric(gw, "lgw_prompt_tokens_total", tenant="acme") == 0
