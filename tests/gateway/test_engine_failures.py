"""Failures on the fake engine: rejected and corrupted adapters, engine death, stream errors.

Each fails only the requests it must, with the OpenAI error envelope, and the gateway says
so on its health endpoint where the whole engine is gone.
"""

from __future__ import annotations

import json

from tests.gateway.conftest import Gateway
from tests.gateway.test_chat_api import assert_envelope, sse_events


def test_adapter_rejected_by_engine_fails_only_its_own_requests(gw: Gateway) -> None:
    version = gw.env.registry.resolve(gw.env.registry.get_tenant("acme"), "support-bot")
    gw.engine.reject.add(version.lora_int_id)
    err = assert_envelope(gw.chat("acme", "support-bot"), 503, "server_error",
                          "adapter_unavailable")
    assert "rejected by the inference engine" in err["message"]
    assert gw.chat("globex", "pirate").status_code == 200
    assert gw.chat("acme", "tiny-llama").status_code == 200


def test_corrupted_artifact_is_detected_and_never_served(gw: Gateway) -> None:
    reg = gw.env.registry
    version = reg.resolve(reg.get_tenant("acme"), "support-bot")
    blob = reg.store._path(version.files["adapter_model.safetensors"])  # behind its back
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    err = assert_envelope(gw.chat("acme", "support-bot"), 503, "server_error",
                          "adapter_unavailable")
    assert "verification" in err["message"] and "sha256" in err["message"]
    assert gw.engine.add_calls == []
    assert gw.chat("globex", "pirate").status_code == 200


def test_tampered_local_copy_is_fetched_again(gateway_factory) -> None:
    gw = gateway_factory(max_cpu_loras=1, max_loras=1)
    assert gw.chat("acme", "support-bot").status_code == 200
    assert gw.chat("acme", "tiny-llama").status_code == 200
    assert gw.chat("globex", "pirate").status_code == 200  # evicts acme from the engine
    cache = gw.client.app.state.services.settings.cache_dir
    version = gw.env.registry.resolve(gw.env.registry.get_tenant("acme"), "support-bot")
    local = cache / version.content_sha256 / "adapter_model.safetensors"
    local.write_bytes(b"garbage")
    r = gw.chat("acme", "support-bot")
    assert r.status_code == 200, r.text
    loaded = gw.engine.loaded[version.lora_int_id]
    assert (loaded.path / "adapter_model.safetensors").read_bytes() != b"garbage"


def test_engine_lru_removes_victims_itself(gateway_factory) -> None:
    gw = gateway_factory(max_cpu_loras=1, max_loras=1)
    for _ in range(3):
        assert gw.chat("acme", "support-bot").status_code == 200
        assert gw.chat("globex", "pirate").status_code == 200
    assert len(gw.engine.loaded) == 1
    assert len(gw.engine.removed) == 5
    # The fake asserts inside generate() that every adapter it saw was accepted.


def test_engine_death_makes_gateway_unready(gw: Gateway) -> None:
    assert gw.client.get("/health").status_code == 200
    gw.engine.die_on_generate = True
    assert_envelope(gw.chat("acme", "support-bot"), 503, "server_error", "engine_unavailable")
    assert gw.deaths == [1]
    assert gw.client.get("/health").status_code == 503
    assert_envelope(gw.chat("globex", "pirate"), 503, "server_error", "engine_unavailable")


def test_stream_error_after_headers_is_a_final_event(gw: Gateway) -> None:
    assert gw.chat("acme", "support-bot").status_code == 200  # adapter loaded
    gw.engine.serving.die_mid_stream = True
    r = gw.chat("acme", "support-bot", stream=True)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_unavailable"
    assert gw.deaths and gw.client.get("/health").status_code == 503
    text = gw.metrics().text
    assert 'lgw_requests_total{adapter="acme/support-bot",status="503",tenant="acme"} 1.0' in text


def test_engine_death_while_loading_an_adapter(gw: Gateway) -> None:
    async def dead_add_lora(lora):
        from gateway.engine import EngineDeadError

        gw.engine.dead = True
        raise EngineDeadError("died in add_lora")

    gw.engine.add_lora = dead_add_lora  # type: ignore[method-assign]
    assert_envelope(gw.chat("acme", "support-bot"), 503, "server_error", "engine_unavailable")
    assert gw.deaths and gw.client.get("/health").status_code == 503


def test_engine_dying_in_the_background_makes_health_fail(gw: Gateway) -> None:
    gw.engine.dead = True
    assert gw.client.get("/health").status_code == 503
    assert gw.deaths


def test_rejected_adapter_is_remembered_and_evicts_nobody_again(gateway_factory) -> None:
    gw = gateway_factory(max_cpu_loras=1, max_loras=1)
    assert gw.chat("globex", "pirate").status_code == 200
    version = gw.env.registry.resolve(gw.env.registry.get_tenant("acme"), "support-bot")
    gw.engine.reject.add(version.lora_int_id)
    for _ in range(3):
        assert gw.chat("acme", "support-bot").status_code == 503
    assert gw.engine.add_calls.count(version.lora_int_id) == 1
    assert len(gw.engine.removed) == 1  # only the first attempt made room


def test_adapter_of_another_base_is_not_served(gw: Gateway, tmp_path) -> None:
    """A version registered for another base is invisible to this gateway (404)."""
    from dataclasses import replace

    from adapters_registry import AdapterTemplate

    reg = gw.env.registry
    other = replace(gw.env.contract, model_id="other-base")
    reg.register_base(other)
    tpl = AdapterTemplate(other.model_id, other.revision)
    reg.register_template(tpl)
    src = reg.resolve(reg.get_tenant("acme"), "support-bot")
    reg.fetch(src, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest.update(base_model_id="other-base", template_id=tpl.template_id)
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "other-base"  # the registry checks the config's claim too
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    reg.push("acme", "other-bot", tmp_path / "a")
    assert_envelope(gw.chat("acme", "other-bot"), 404, "invalid_request_error", "model_not_found")
