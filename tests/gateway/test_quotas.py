"""Per-tenant quotas through the API: limits from the registry, OpenAI's 429 and headers,
Redis shared by two replicas, and what happens when Redis fails."""

from __future__ import annotations

import asyncio
import re

import pytest

from adapters_registry import TenantLimits
from tests.gateway.conftest import Gateway

REDIS = "redis://127.0.0.1:6379/0"
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests")
TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                 "x-ratelimit-reset-tokens")


def limit(gw: Gateway, tenant: str, **fields) -> None:
    gw.env.registry.set_limits(tenant, TenantLimits(**fields))  # type: ignore[attr-defined]


def assert_429(resp, kind: str = "requests", retry: bool = True) -> dict:
    assert resp.status_code == 429, resp.text
    err = resp.json()["error"]
    assert (err["type"], err["code"]) == (kind, "rate_limit_exceeded")
    assert ("retry-after" in resp.headers) == retry
    if retry:
        assert int(resp.headers["retry-after"]) >= 1
    return err


def metric(gw: Gateway, name: str, **labels: str) -> float:
    text = gw.metrics().text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("redis_url", [None, REDIS], ids=["in-process", "redis"])
def test_requests_per_minute_with_openai_headers(gateway_factory, redis_url) -> None:
    gw = gateway_factory(redis_url=redis_url)
    limit(gw, "acme", rpm=2)
    first = gw.chat("acme", "support-bot")
    assert first.status_code == 200
    assert [first.headers[h] for h in RATE_HEADERS[:2]] == ["2", "1"]
    assert re.fullmatch(r"\d+(ms|(\.\d+)?s|m\d+s)", first.headers["x-ratelimit-reset-requests"])
    assert gw.chat("acme", "support-bot").headers["x-ratelimit-remaining-requests"] == "0"
    refused = gw.chat("acme", "support-bot")
    assert_429(refused)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    other = gw.chat("globex", "pirate")  # another tenant's budget is its own
    assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers
    assert metric(gw, "lgw_quota_rejections_total", tenant="acme", limit="requests") == 1
    assert metric(gw, "lgw_requests_total", tenant="acme", status="429") == 1


def test_two_replicas_share_one_limit_in_redis(gateway_factory) -> None:
    one, two = gateway_factory(redis_url=REDIS), gateway_factory(redis_url=REDIS)
    limit(one, "acme", rpm=5)
    answers = [(one if i % 2 else two).chat("acme", "support-bot").status_code for i in range(10)]
    assert answers.count(200) == 5 and answers.count(429) == 5, answers
    assert answers[:5] == [200] * 5


def test_tokens_per_minute_prompt_checked_completion_charged(gateway_factory) -> None:
    gw = gateway_factory(redis_url=REDIS)
    prompt = gw.chat("acme", "support-bot").json()["usage"]["prompt_tokens"]
    limit(gw, "acme", tpm=prompt - 1)
    err = assert_429(gw.chat("acme", "support-bot"), "tokens", retry=False)
    assert "Request too large" in err["message"]
    limit(gw, "acme", tpm=prompt + 2)
    ok = gw.chat("acme", "support-bot")  # the prompt fits; 4 completion tokens take it into debt
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit-tokens"] == str(prompt + 2)
    assert ok.headers["x-ratelimit-remaining-tokens"] == "2"  # after the prompt, before completion
    assert_429(gw.chat("acme", "support-bot"), "tokens")


def test_concurrency_limit_counts_requests_in_flight(gateway_factory) -> None:
    gw = gateway_factory(redis_url=REDIS, default_concurrency=1)
    stream = gw.client.stream("POST", "/v1/chat/completions", headers=gw.headers("acme"), json={
        "model": "support-bot", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    with stream as open_stream:
        assert open_stream.status_code == 200
        assert_429(gw.chat("acme", "support-bot"))  # the open stream holds the only lease
        assert gw.chat("globex", "pirate").status_code == 200
        open_stream.read()
    assert gw.chat("acme", "support-bot").status_code == 200  # released with the answer


def test_ceilings_on_max_tokens_and_prompt_length(gw: Gateway) -> None:
    limit(gw, "acme", max_tokens=2)
    capped = gw.chat("acme", "support-bot")
    assert capped.json()["choices"][0]["message"]["content"] == "acme/support-bot@v1 says"
    over = gw.chat("acme", "support-bot", max_tokens=3)
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    limit(gw, "acme", max_prompt_tokens=3)
    long = gw.chat("acme", "support-bot")
    assert long.status_code == 400
    assert long.json()["error"]["code"] == "context_length_exceeded"


def test_defaults_from_settings_and_weight_validation(gateway_factory) -> None:
    gw = gateway_factory(default_rpm=1)
    assert gw.chat("acme", "support-bot").status_code == 200
    assert_429(gw.chat("acme", "support-bot"))
    limit(gw, "acme", rpm=100)  # the tenant's own limit wins over the default
    assert gw.chat("acme", "support-bot").status_code == 200
    from adapters_registry.errors import ValidationError

    with pytest.raises(ValidationError, match="weight"):
        limit(gw, "acme", weight=0)
    with pytest.raises(ValidationError, match="rpm"):
        limit(gw, "acme", rpm=0)


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_redis_down_fails_as_configured_never_500(gateway_factory, mode, caplog) -> None:
    gw = gateway_factory(redis_url="redis://127.0.0.1:1/0", quota_failure_mode=mode)
    limit(gw, "acme", rpm=1, tpm=10_000)
    answers = [gw.chat("acme", "support-bot") for _ in range(3)]
    if mode == "open":
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert metric(gw, "lgw_quota_backend_errors_total", outcome="failed_open") >= 3
    else:
        for a in answers:
            assert a.status_code == 503 and a.headers["retry-after"] == "1", a.text
        assert metric(gw, "lgw_quota_backend_errors_total", outcome="failed_closed") == 3
    assert "quota store failed" in caplog.text
    assert gw.chat("globex", "pirate").status_code == 200  # no limits: Redis is not asked


def test_no_redis_is_said_once_at_start(gateway_factory, caplog) -> None:
    gateway_factory()
    assert "rate limits are per process" in caplog.text


def test_admin_api_sets_and_reads_limits(gateway_factory) -> None:
    gw = gateway_factory(admin_api_key="k" * 40)
    admin = {"Authorization": "Bearer " + "k" * 40}
    path = "/admin/v1/tenants/acme/limits"
    assert gw.client.get(path, headers=admin).json() == {
        "rpm": None, "tpm": None, "concurrency": None, "max_tokens": None,
        "max_prompt_tokens": None, "weight": None, "max_file_bytes": None,
        "max_running_jobs": None, "max_queued_jobs": None, "max_training_tokens": None}
    put = gw.client.put(path, headers=admin, json={"rpm": 1, "weight": 2.5})
    assert put.status_code == 200 and put.json()["rpm"] == 1
    assert gw.client.get(path, headers=admin).json()["weight"] == 2.5
    assert gw.chat("acme", "support-bot").status_code == 200
    assert_429(gw.chat("acme", "support-bot"))
    bad = gw.client.put(path, headers=admin, json={"rpm": 0})
    assert bad.status_code == 400
    assert gw.client.put(path, headers=admin, json={"rpm": "5"}).status_code == 400
    assert gw.client.put("/admin/v1/tenants/nobody/limits", headers=admin, json={}).status_code == 404
    assert gw.client.get(path).status_code == 401


class CountingStore:
    """The configured store; writes down each call once it is answered. A charge that does not
    check (the background kind) is answered only once ``gate`` opens."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    def __getattr__(self, name: str):
        op = getattr(self.inner, name)

        async def counted(*args, **kwargs):
            if name == "charge" and not kwargs["check"] and self.gate is not None:
                # Never opens if the request waits for this call before its first token.
                await asyncio.wait_for(self.gate.wait(), 30)
            result = await op(*args, **kwargs)
            self.calls.append(name if name != "charge" else f"charge(check={kwargs['check']})")
            return result
        return counted


@pytest.mark.parametrize("redis_url", [None, REDIS], ids=["in-process", "redis"])
def test_a_request_under_quota_waits_for_one_store_call_before_its_first_token(
        gateway_factory, redis_url) -> None:
    gw = gateway_factory(redis_url=redis_url)
    limit(gw, "acme", rpm=100, tpm=10_000, concurrency=4)
    store = gw.client.app.state.services.quotas.store = CountingStore(
        gw.client.app.state.services.quotas.store)
    before_first_token: list[list[str]] = []

    async def first_token() -> None:
        before_first_token.append(list(store.calls))
        assert store.gate is not None
        store.gate.set()

    async def install_gate() -> None:
        store.gate = asyncio.Event()

    gw.client.portal.call(install_gate)  # an event of the app's own loop
    gw.engine.serving.after_first_content = first_token
    r = gw.chat("acme", "support-bot", stream=True)
    assert r.status_code == 200 and "error" not in r.text
    # The admission (rpm, concurrency lease, tokens not in debt) is awaited; the prompt fits the
    # bucket the admission read, so its charge goes in the background, never before the token.
    assert before_first_token == [["admit"]], before_first_token
    assert "charge(check=True)" not in store.calls
    assert "release" in store.calls and "charge(check=False)" in store.calls
    gw.engine.serving.after_first_content = None
    store.gate = None
    usage = gw.chat("acme", "support-bot").json()["usage"]
    assert r.headers["x-ratelimit-remaining-tokens"] == str(10_000 - usage["prompt_tokens"])
    # A prompt that may not fit what the admission read is checked before generation: there
    # the protection acts (here it refuses: the prompt is larger than the whole minute's budget).
    limit(gw, "globex", rpm=100, tpm=usage["prompt_tokens"] - 1)  # a tenant with a full bucket
    store.calls.clear()
    assert_429(gw.chat("globex", "pirate"), "tokens", retry=False)
    assert store.calls[:2] == ["admit", "charge(check=True)"], store.calls
