"""A rollout's evidence at the gateway (fake engine): each answer's times and refusals in
the ledger beside its usage, and shadow comparisons: the stable version's requests answered
again by both versions, greedily, never returned, never charged, using spare capacity only,
and a candidate whose answers diverge rolled back on them (issue 27, item 3)."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from adapters_registry import AdapterVersion, RolloutRules, Shadow, Tenant, TenantLimits
from gateway.api.schemas import ChatCompletionRequest
from gateway.engine.shadow import LOWEST_PRIORITY, ShadowRunner, compare, tokens
from gateway.observability.ledger import UsageLedger
from gateway.observability.metrics import GatewayMetrics
from tests.gateway.conftest import Gateway, make_settings

VERSION = "x-lora-gateway-adapter-version"


def send(gw: Gateway, n: int, tag: str) -> list[str]:
    out = []
    for i in range(n):
        body = {"model": "support-bot", "user": f"{tag}-{i}", "max_tokens": 100,
                "temperature": 1.3, "messages": [{"role": "user", "content": "Hi"}]}
        r = gw.client.post("/v1/chat/completions", json=body, headers=gw.headers("acme"))
        assert r.status_code == 200, r.text
        assert "logprobs" not in r.text or r.json()["choices"][0]["logprobs"] is None
        out.append(r.headers[VERSION])
    return out


def compared(gw: Gateway, outcome: str = "compared") -> float:
    line = (f'lgw_shadow_comparisons_total{{adapter="acme/support-bot",outcome="{outcome}",'
            f'tenant="acme"}} ')
    found = [x for x in gw.metrics().text.splitlines() if x.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_shadows_compare_the_stable_answers_uncharged_and_roll_a_diverging_candidate_back(
        registry_env, trained_adapters, gateway_factory) -> None:
    reg = registry_env.registry
    reg.push("acme", "support-bot", trained_adapters["globex"])  # v2: the fake says its name
    gw = gateway_factory(rollout_decide_seconds=0)
    rules = RolloutRules(min_requests=2, min_step_seconds=0, shadow_percent=100,
                         min_shadow_pairs=3, max_shadow_kl=1.0)
    reg.rollouts.start("acme", "support-bot", "prod", 2, [10, 100], rules)
    served = send(gw, 12, "a")
    on_stable = served.count("acme/support-bot@v1")
    assert on_stable >= 6
    deadline = time.monotonic() + 10
    while compared(gw) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert compared(gw) >= 3
    shadows = [(req, route) for req, route in zip(gw.engine.serving.requests,
                                                  gw.engine.serving.routes, strict=True)
               if route.request_id.startswith("shadow-")]
    assert shadows and all(req.temperature == 0 and req.max_tokens == 64 and req.n == 1
                           and req.top_logprobs == 5 and not req.stream for req, _ in shadows)
    assert {route.lora.name for _, route in shadows} == {"acme/support-bot@v1", "acme/support-bot@v2"}
    # never charged: no quota meter, and the ledger counts only the callers' own answers
    assert all(route.meter.on_prompt is None for _, route in shadows)
    app = gw.client.app
    assert gw.client.portal is not None
    gw.client.portal.call(app.state.ledger.flush)  # type: ignore[attr-defined]
    now = datetime.now(UTC)
    usage = {r.model: r.counts.requests_2xx
             for r in reg.usage(now - timedelta(hours=1), now + timedelta(minutes=2))}
    assert usage["acme/support-bot@v1"] + usage.get("acme/support-bot@v2", 0) == 12
    (r,) = gw.client.portal.call(app.state.rollouts.once)  # type: ignore[attr-defined]
    assert r.state == "rolled_back" and "KL(stable || candidate)" in r.reason, r.reason
    assert r.evidence["candidate"]["shadow_agreement"] == 0.0
    assert r.evidence["stable"]["ttft_p50_ms"] is not None


def test_a_request_refused_by_its_quota_starts_no_shadow(registry_env, trained_adapters,
                                                        gateway_factory) -> None:
    reg = registry_env.registry
    reg.push("acme", "support-bot", trained_adapters["globex"])
    gw = gateway_factory(rollout_decide_seconds=0)
    reg.set_limits("acme", TenantLimits(tpm=3))  # below any prompt: refused by the engine's meter
    reg.rollouts.start("acme", "support-bot", "prod", 2, [10, 100],
                       RolloutRules(shadow_percent=100, min_shadow_pairs=1))
    for i in range(8):
        body = {"model": "support-bot", "user": f"u-{i}", "messages": [{"role": "user", "content": "Hi"}]}
        r = gw.client.post("/v1/chat/completions", json=body, headers=gw.headers("acme"))
        assert r.status_code == 429 and "Request too large" in r.text, r.text
    time.sleep(0.2)
    assert not [route for route in gw.engine.serving.routes if route.request_id.startswith("shadow-")]
    assert compared(gw) == compared(gw, "skipped") == compared(gw, "failed") == 0


def test_refusals_and_times_reach_the_ledger(registry_env, gateway_factory) -> None:
    gw = gateway_factory(refusal_pattern=r"\S+ says hello")  # every fake answer "refuses"
    for _ in range(3):
        assert gw.chat("acme", "support-bot").status_code == 200
    ledger = gw.client.app.state.ledger  # type: ignore[attr-defined]
    (stats,) = [v for k, v in ledger._stats.items() if k[1] == "acme/support-bot@v1"]
    assert stats.refusals == 3 and sum(stats.ttft.values()) == 3 and sum(stats.latency.values()) == 3
    quiet = gateway_factory(refusal_pattern="")
    assert quiet.chat("acme", "support-bot").status_code == 200
    (stats,) = quiet.client.app.state.ledger._stats.values()  # type: ignore[attr-defined]
    assert stats.refusals == 0


def test_a_bad_refusal_pattern_is_refused_at_start(registry_env, tmp_path) -> None:
    with pytest.raises(ValidationError, match="refusal_pattern is not a regular expression"):
        make_settings(registry_env, tmp_path, refusal_pattern="(unclosed")


class _Serving:
    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, req, route):  # never answers in time
        self.calls += 1
        await asyncio.sleep(10)


async def test_without_spare_capacity_a_shadow_is_skipped_and_a_stuck_one_times_out() -> None:
    class Adapters:
        @asynccontextmanager
        async def use(self, version):
            yield SimpleNamespace(lora=None)

    metrics = GatewayMetrics()
    spare = [False]
    serving = _Serving()
    runner = ShadowRunner(serving, Adapters(), UsageLedger("r"), metrics,  # type: ignore[arg-type]
                          lambda: spare[0], timeout_s=0.05, engine_priority=True)
    shadow = Shadow(_v(1), _v(2), 100.0)
    req = ChatCompletionRequest(model="bot", messages=[{"role": "user", "content": "Hi"}])
    acme = Tenant(1, "acme")
    assert runner.prepare(acme, "responses", req, shadow) is None, "only chat and completions"
    start = runner.prepare(acme, "chat", req, shadow)
    assert start is not None and not start()
    spare[0] = True
    assert start()
    assert not start(), "one pair at a time"
    await asyncio.sleep(0.2)
    out = generate_latest(metrics.registry).decode()
    assert 'outcome="skipped",tenant="acme"} 2.0' in out
    assert 'outcome="timeout",tenant="acme"} 1.0' in out
    assert serving.calls == 1 and req.priority == 0, "the caller's request is left as it was"


def _v(n: int) -> AdapterVersion:
    fields = {f: None for f in AdapterVersion.__dataclass_fields__}
    fields.update(tenant="acme", adapter="support-bot", version=n)
    return AdapterVersion(**fields)


def test_greedy_answers_compare_on_agreement_prefix_and_kl() -> None:
    same = [("Hi", {"Hi": -0.1, "Yo": -2.5}), ("!", {"!": -0.2, ".": -1.8})]
    assert compare(same, same) == (True, 1.0, 0.0)
    parted = [("Hi", {"Hi": -0.1, "Yo": -2.5}), (".", {".": -0.2, "!": -1.8}), ("x", {"x": 0.0})]
    agreed, prefix, kl = compare(same, parted)
    assert (agreed, prefix) == (False, 0.5) and 0 < kl < 1.5  # KL at "Hi" 0, at the parting > 0
    assert compare([], []) == (True, 1.0, 0.0)
    assert compare(same, [])[:2] == (False, 0.0)
    chat = {"choices": [{"logprobs": {"content": [
        {"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1}]}]}}]}
    assert tokens(chat) == [("Hi", {"Hi": -0.1})]
    completion = {"choices": [{"logprobs": {"tokens": ["Hi"], "token_logprobs": [-0.1],
                                             "top_logprobs": [{"Hi": -0.1, "Yo": -3.0}]}}]}
    assert tokens(completion) == [("Hi", {"Hi": -0.1, "Yo": -3.0})]
    assert LOWEST_PRIORITY > 2**40


def test_a_shadow_request_is_a_valid_greedy_copy_and_the_callers_is_untouched() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletion

    from gateway.api.schemas import CompletionRequest

    runner = ShadowRunner(None, None, UsageLedger("r"), GatewayMetrics(),  # type: ignore[arg-type]
                          lambda: True, max_tokens=16, engine_priority=True)
    acme = Tenant(7, "acme")
    chat = ChatCompletionRequest(model="bot", messages=[{"role": "user", "content": "Hi"}],
                                 temperature=1.2, n=3, stream=True, max_completion_tokens=500)
    completion = CompletionRequest(model="bot", prompt="Hi", echo=True, max_tokens=8)
    for kind, req, vllm_type in (("chat", chat, VllmChat), ("completion", completion, VllmCompletion)):
        before = req.model_dump()
        copy = runner._greedy(acme, kind, req)
        assert req.model_dump() == before
        again = vllm_type.model_validate(copy.model_dump())  # what vLLM's serving class takes
        assert (again.temperature, again.n, again.stream) == (0.0, 1, False)
        assert again.priority == LOWEST_PRIORITY and again.cache_salt == "tenant-7"
    assert copy.max_tokens == 8 and copy.logprobs == 5 and copy.echo is False
    chat_copy = runner._greedy(acme, "chat", chat)
    assert chat_copy.max_tokens == 16 and chat_copy.max_completion_tokens is None
    assert chat_copy.logprobs is True and chat_copy.top_logprobs == 5
