"""The OpenAI surface, tenancy and error envelope, on a fake engine and a real registry."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.gateway.conftest import Gateway


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def assert_envelope(resp, status: int, type_: str, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    assert isinstance(err["code"], str) and err["code"], err  # every error names its code
    if code is not None:
        assert err["code"] == code
    return err


def test_tenant_gets_its_adapter_with_usage_and_tier(gw: Gateway) -> None:
    r = gw.chat("acme", "support-bot")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "support-bot"
    assert body["choices"][0]["message"]["content"] == "acme/support-bot@v1 says hello world"
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4
    assert r.headers["x-lora-gateway-adapter-tier"] == "remote_fetch"
    again = gw.chat("acme", "support-bot")
    assert again.headers["x-lora-gateway-adapter-tier"] == "slot_hit"
    assert gw.engine.add_calls == [gw.engine.add_calls[0]], "add_lora once per version"


def test_alias_and_pinned_version_names(gw: Gateway) -> None:
    for model in ("support-bot:prod", "support-bot@v1"):
        r = gw.chat("acme", model)
        assert r.status_code == 200, (model, r.text)
        assert r.json()["choices"][0]["message"]["content"].startswith("acme/support-bot@v1")
    assert_envelope(gw.chat("acme", "support-bot@v9"), 404, "invalid_request_error",
                    "model_not_found")
    assert_envelope(gw.chat("acme", "support-bot:canary"), 404, "invalid_request_error",
                    "model_not_found")


def test_other_tenants_adapter_is_not_found_not_forbidden(gw: Gateway) -> None:
    theirs = assert_envelope(gw.chat("acme", "pirate"), 404, "invalid_request_error",
                             "model_not_found")
    nobody = assert_envelope(gw.chat("acme", "no-such-adapter"), 404, "invalid_request_error",
                             "model_not_found")
    # Same wording either way, so names cannot be probed.
    assert theirs["message"].replace("pirate", "X") == nobody["message"].replace(
        "no-such-adapter", "X")
    assert gw.engine.add_calls == []


def test_base_model_is_served_without_adapter(gw: Gateway) -> None:
    r = gw.chat("acme", "tiny-llama")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "base says hello world"
    assert r.headers["x-lora-gateway-adapter-tier"] == "base"


def test_stream_matches_non_stream_and_ends_with_done(gw: Gateway) -> None:
    full = gw.chat("globex", "pirate").json()["choices"][0]["message"]["content"]
    r = gw.chat("globex", "pirate", stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_models_lists_only_the_callers_adapters(gw: Gateway) -> None:
    r = gw.client.get("/v1/models", headers=gw.headers("acme"))
    ids = {m["id"] for m in r.json()["data"]}
    assert ids == {"tiny-llama", "support-bot", "support-bot:prod", "support-bot@v1"}


@pytest.mark.parametrize("header", [None, "Bearer lgw-wrong", "Basic abc", "Bearer "])


def test_bad_or_missing_key_is_401(gw: Gateway, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    body = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}
    r = gw.client.post("/v1/chat/completions", json=body, headers=headers)
    assert_envelope(r, 401, "authentication_error", "invalid_api_key")


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param", [
    ({"model": "support-bot"}, "messages"),
    ({"model": "support-bot", "messages": []}, "messages"),
    ({"model": "support-bot", "messages": HI, "temperature": 5}, "temperature"),
    ({"model": "support-bot", "messages": HI, "n": 0}, "n"),
    ({"model": "support-bot", "messages": HI, "max_tokens": "10"}, "max_tokens"),  # strict types
    ({"model": "support-bot", "messages": HI, "top_logprobs": 3}, "top_logprobs"),
    ({"model": "support-bot", "messages": HI, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": "support-bot", "messages": HI, "presence_penalty": -2.5}, "presence_penalty"),
    ({"model": "support-bot", "messages": HI, "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": "support-bot", "messages": HI, "chat_template": "{{ 1 }}"}, "chat_template"),
    ({"model": "support-bot", "messages": HI, "vllm_xargs": {"a": 1}}, "vllm_xargs"),
    ({"model": "support-bot", "messages": HI, "bogus": 1}, "bogus"),
    ({"model": "support-bot", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]}, "messages"),
    ({"model": "support-bot", "messages": HI, "tools": []}, "tools"),  # no tool parser here
    ({"model": "support-bot", "messages": HI, "echo": True}, "echo"),  # would score the prompt
    ({"model": "support-bot", "messages": HI, "prompt_logprobs": 1}, "prompt_logprobs"),
])


def test_invalid_bodies_are_400_not_422(gw: Gateway, body: dict, param: str | None) -> None:
    r = gw.client.post("/v1/chat/completions", json=body, headers=gw.headers("acme"))
    err = assert_envelope(r, 400, "invalid_request_error")
    if param:
        assert err["param"] == param and param in err["message"]


@pytest.mark.parametrize("role", ["wizard", "System", ""])
def test_an_unknown_role_is_400_naming_it_as_openai_answers(gw: Gateway, role: str) -> None:
    body = {"model": "support-bot", "messages": [HI[0], {"role": role, "content": "hi"}]}
    r = gw.client.post("/v1/chat/completions", json=body, headers=gw.headers("acme"))
    err = assert_envelope(r, 400, "invalid_request_error", "invalid_value")
    assert err["param"] == "messages[1].role" and repr(role) in err["message"]
    assert "'developer'" in err["message"]


def test_malformed_json_is_400(gw: Gateway) -> None:
    r = gw.client.post("/v1/chat/completions", content=b"{not json",
                       headers={**gw.headers("acme"), "content-type": "application/json"})
    assert_envelope(r, 400, "invalid_request_error")


def test_oversized_body_is_413(gateway_factory) -> None:
    gw = gateway_factory(max_request_bytes=2048)
    r = gw.chat("acme", "support-bot", content="x" * 5000)
    assert_envelope(r, 413, "invalid_request_error", "payload_too_large")


def test_metrics_are_exported(gw: Gateway) -> None:
    gw.chat("acme", "support-bot")
    text = gw.metrics().text
    assert 'lgw_requests_total{adapter="acme/support-bot",status="200",tenant="acme"} 1.0' in text
    assert 'lgw_adapter_requests_total{tier="remote_fetch"} 1.0' in text
    assert 'lgw_adapter_cache_misses_total{cache="disk"} 1.0' in text
    assert 'lgw_adapter_cache_loads_total{cache="engine"} 1.0' in text
    assert "lgw_time_to_first_token_seconds_bucket" in text


def test_unknown_route_uses_the_envelope(gw: Gateway) -> None:
    assert_envelope(gw.client.get("/v1/nope"), 404, "invalid_request_error")


def test_gateway_refuses_a_base_that_does_not_match(registry_env, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from gateway.app import create_app
    from gateway.errors import BaseMismatchError
    from tests.gateway.conftest import make_settings
    from tests.gateway.fakes import FakeEngine

    other = tmp_path / "other-base"
    shutil.copytree(registry_env.base.path, other)
    (other / "chat_template.jinja").write_text("{{ messages }}")
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same weights: only the template differs
    app = create_app(make_settings(registry_env, tmp_path, base_model_dir=other),
                     engine_factory=lambda _s: FakeEngine())
    with pytest.raises(BaseMismatchError, match="chat_template_sha256"), TestClient(app):
        pass


def test_chunked_oversized_body_is_413(gateway_factory) -> None:
    gw = gateway_factory(max_request_bytes=2048)
    body = json.dumps({"model": "support-bot",
                       "messages": [{"role": "user", "content": "x" * 5000}]}).encode()

    def chunks():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = gw.client.post("/v1/chat/completions", content=chunks(),
                       headers={**gw.headers("acme"), "content-type": "application/json"})
    assert_envelope(r, 413, "invalid_request_error", "payload_too_large")


@pytest.mark.parametrize("extra", [{"stop": [""]}, {"stop": ""}, {"seed": 2**64}])


def test_engine_invalid_parameters_are_400(gw: Gateway, extra: dict) -> None:
    assert_envelope(gw.chat("acme", "support-bot", **extra), 400, "invalid_request_error")


def test_log_lines_carry_request_id_and_tenant(gw: Gateway, caplog) -> None:
    import logging

    from gateway.observability.logs import RequestContextFilter

    caplog.handler.addFilter(RequestContextFilter())
    with caplog.at_level(logging.INFO):
        r = gw.client.post("/v1/chat/completions", headers={**gw.headers("acme"),
                                                             "x-request-id": "req-42"},
                           json={"model": "support-bot",
                                 "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["x-request-id"] == "req-42"
    mine = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "req-42"]
    assert mine and all(rec.tenant == "acme" for rec in mine)
    assert all("hi" not in rec.getMessage() for rec in caplog.records), "no prompts in logs"


def test_alias_move_and_rollback_are_seen_within_the_ttl(gateway_factory, tiny_base,
                                                         tiny_template, tmp_path) -> None:
    import time

    from tests.conftest import train_tiny_adapter

    gw = gateway_factory(resolve_ttl_seconds=0.3)
    reg = gw.env.registry

    def served() -> str:
        r = gw.chat("acme", "support-bot")
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"].split()[0]

    assert served() == "acme/support-bot@v1"
    v2 = train_tiny_adapter(tiny_base, tiny_template, "v2 answer", tmp_path / "v2", tmp_path, seed=5)
    reg.push("acme", "support-bot", v2)
    reg.set_alias("acme", "support-bot", "prod", 2)
    time.sleep(0.35)
    assert served() == "acme/support-bot@v2"
    reg.set_alias("acme", "support-bot", "prod", 1)  # rollback
    time.sleep(0.35)
    assert served() == "acme/support-bot@v1"


def test_liveness_and_readiness_are_separate(gw: Gateway) -> None:
    for path in ("/health", "/health/ready", "/health/live"):
        assert gw.client.get(path).status_code == 200
    gw.client.app.state.services.draining = True  # what SIGTERM does
    assert gw.client.get("/health/ready").json() == {"status": "draining"}
    assert gw.client.get("/health/ready").status_code == 503
    assert gw.client.get("/health/live").status_code == 200  # busy or draining is not dead
    gw.engine.dead = True
    assert gw.client.get("/health/live").status_code == 503


def test_metrics_port_keeps_metrics_off_the_api_port(gateway_factory) -> None:
    gw = gateway_factory(metrics_port=9400)
    api = gw.client  # the test client talks to port 80 unless told otherwise
    assert gw.chat("acme", "support-bot").status_code == 200
    r = api.get("/metrics")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    metrics = api.get("http://testserver:9400/metrics")
    assert metrics.status_code == 200 and "lgw_requests_total" in metrics.text
    # and nothing of the API on the metrics port
    assert api.get("http://testserver:9400/v1/models", headers=gw.headers("acme")).status_code == 404


def test_without_a_metrics_port_metrics_are_the_admins_only(gateway_factory) -> None:
    # They name every tenant's adapters: a tenant's key (or none) gets nothing on the API port.
    closed = gateway_factory(metrics_port=None)
    r = closed.client.get("/metrics", headers=closed.headers("acme"))
    assert r.status_code == 404 and "--metrics-port" in r.json()["error"]["message"]
    admin_key = "k" * 40
    gw = gateway_factory(metrics_port=None, admin_api_key=admin_key)
    assert gw.chat("acme", "support-bot").status_code == 200
    for headers in ({}, gw.headers("acme")):
        assert gw.client.get("/metrics", headers=headers).status_code == 401
    r = gw.client.get("/metrics", headers={"Authorization": f"Bearer {admin_key}"})
    assert r.status_code == 200 and "lgw_requests_total" in r.text


def test_completions_serve_tenants_adapters_batches_and_streams(gw: Gateway) -> None:
    body = {"model": "support-bot", "prompt": ["Hello", "Who are you?"], "n": 2, "max_tokens": 3}
    r = gw.client.post("/v1/completions", json=body, headers=gw.headers("acme"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "support-bot"
    assert len(out["choices"]) == 4 and out["choices"][0]["text"] == "acme/support-bot@v1 says hello"
    assert r.headers["x-lora-gateway-adapter-tier"] == "remote_fetch"
    stream = gw.client.post("/v1/completions", json={**body, "stream": True},
                            headers=gw.headers("acme"))
    assert sse_events(stream.text)[-1] == "[DONE]"
    theirs = gw.client.post("/v1/completions", json={**body, "model": "pirate"},
                            headers=gw.headers("acme"))
    assert_envelope(theirs, 404, "invalid_request_error", "model_not_found")
    bad = gw.client.post("/v1/completions", json={**body, "logprobs": 21}, headers=gw.headers("acme"))
    assert assert_envelope(bad, 400, "invalid_request_error")["param"] == "logprobs"


def test_every_choice_and_prompt_is_metered(gw: Gateway, caplog) -> None:
    import logging

    def served() -> list[tuple[str, int, int]]:
        return [(r.status, r.prompt_tokens, r.completion_tokens) for r in caplog.records
                if r.getMessage().startswith("served model=acme/support-bot")]

    with caplog.at_level(logging.INFO, logger="gateway.engine.serving"):
        assert gw.chat("acme", "support-bot", n=3).status_code == 200
        assert served()[0][0] == "200" and served()[0][2] == 12  # 3 choices x 4 tokens
        body = {"model": "support-bot", "prompt": ["a b", "c d e"], "n": 2, "stream": True}
        gw.client.post("/v1/completions", json=body, headers=gw.headers("acme"))
        assert served()[1] == ("200", 5, 16)  # 2 prompts x 2 choices
    text = gw.metrics().text
    assert 'lgw_completion_tokens_total{adapter="acme/support-bot",tenant="acme"} 28.0' in text


def test_the_layer_gets_the_gateway_request_id_and_tenant_cache_salt(gw: Gateway) -> None:
    r = gw.chat("acme", "support-bot")
    sent = gw.engine.serving.requests[-1]
    assert r.json()["id"] == f"chatcmpl-{sent.request_id}"
    assert sent.cache_salt.startswith("tenant-")


def test_openapi_lists_every_parameter_with_type_and_range(gw: Gateway) -> None:
    schemas = gw.client.get("/openapi.json").json()["components"]["schemas"]
    chat, comp = schemas["ChatCompletionRequest"]["properties"], schemas["CompletionRequest"]["properties"]
    for name in ("n", "seed", "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "top_k", "min_p",
                 "min_tokens", "ignore_eos", "max_completion_tokens", "user", "response_format",
                 "tools", "tool_choice", "parallel_tool_calls"):
        assert name in chat, name
    for name in ("prompt", "echo", "logprobs", "suffix", "n", "ignore_eos", "stream_options"):
        assert name in comp, name
    assert not {"chat_template", "vllm_xargs", "priority", "request_id", "cache_salt"} & chat.keys()
    temperature = chat["temperature"]["anyOf"][0]
    assert (temperature["type"], temperature["minimum"], temperature["maximum"]) == ("number", 0, 2)
    assert chat["top_logprobs"]["maximum"] == 20 and comp["logprobs"]["anyOf"][0]["maximum"] == 20
    assert "/v1/completions" in gw.client.get("/openapi.json").json()["paths"]


def test_tools_need_a_tool_parser_for_the_base(gateway_factory) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    gw = gateway_factory()
    err = assert_envelope(gw.chat("acme", "support-bot", tools=[tool]), 400, "invalid_request_error")
    assert err["param"] == "tools" and "does not support tools" in err["message"]
    assert gateway_factory(tool_call_parser="hermes").chat(
        "acme", "support-bot", tools=[tool]).status_code == 200


ROUTER_FIELDS = {"no_stop_trim": False, "return_hidden_states": False,
                 "separate_reasoning": True, "stream_reasoning": True}


def test_the_fields_vllm_router_adds_are_accepted_at_their_no_op_values(gw: Gateway) -> None:
    """vllm-router re-serializes every body with these SGLang fields (vllm-project/router#110)."""
    r = gw.chat("acme", "support-bot", **ROUTER_FIELDS)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "acme/support-bot@v1 says hello world"


@pytest.mark.parametrize("name", sorted(ROUTER_FIELDS))


def test_the_router_fields_at_any_other_value_are_refused(gw: Gateway, name: str) -> None:
    for value in (not ROUTER_FIELDS[name], int(ROUTER_FIELDS[name]), "yes"):
        err = assert_envelope(gw.chat("acme", "support-bot", **{name: value}), 400,
                              "invalid_request_error")
        assert name in (err["param"] or "") + err["message"]


def test_every_answer_names_the_replica(gw: Gateway) -> None:
    import socket

    for r in (gw.chat("acme", "support-bot"), gw.chat("acme", "no-such-model"),
              gw.client.get("/health/live")):
        assert r.headers["x-lora-gateway-replica"] == socket.gethostname()
