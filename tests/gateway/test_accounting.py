"""Every inference answer is counted once, by status, in one middleware: 2xx, 4xx, 5xx, 429
and streams the client abandoned; releases run however a request ends."""

from __future__ import annotations

import contextlib
from typing import Any

from adapters_registry import TenantLimits
from adapters_registry.records import Tenant
from gateway.api.request import RequestEdge, RequestScope
from gateway.observability.metrics import GatewayMetrics
from tests.gateway.conftest import Gateway
from tests.gateway.test_quotas import metric


def test_every_status_is_counted_with_its_labels(gw: Gateway) -> None:
    gw.env.registry.set_limits("acme", TenantLimits(rpm=2))  # type: ignore[attr-defined]
    assert gw.chat("acme", "support-bot").status_code == 200
    assert gw.chat("acme", "tiny-llama").status_code == 200
    assert gw.chat("globex", "no-such-model").status_code == 404
    bad = gw.client.post("/v1/chat/completions", headers=gw.headers("globex"),
                         json={"model": "pirate", "messages": []})
    assert bad.status_code == 400
    assert gw.client.post("/v1/chat/completions", json={}).status_code == 401
    assert gw.chat("acme", "support-bot").status_code == 429
    assert gw.client.get("/v1/models", headers=gw.headers("acme")).status_code == 200
    counts = {
        ("acme", "acme/support-bot", "200"): 1, ("acme", "tiny-llama", "200"): 1,
        ("globex", "-", "404"): 1, ("globex", "-", "400"): 1, ("-", "-", "401"): 1,
        ("acme", "-", "429"): 1,
    }
    for (tenant, adapter, status), n in counts.items():
        assert metric(gw, "lgw_requests_total", tenant=tenant, adapter=adapter, status=status) == n
    total = sum(float(line.rsplit(" ", 1)[1]) for line in gw.metrics().text.splitlines()
                if line.startswith("lgw_requests_total{"))
    assert total == 6  # model listings and probes are not inference answers


async def _run(app: Any, messages: list[dict[str, Any]]) -> tuple[GatewayMetrics, list[str]]:
    metrics = GatewayMetrics()
    released: list[str] = []

    async def inner(scope, receive, send) -> None:
        req: RequestScope = scope["lgw.request"]
        req.identify(Tenant(1, "acme"))
        req.label = "acme/bot"
        req.on_close(lambda: released.append("slot"))
        await app(scope, receive, send)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "path": "/v1/chat/completions", "headers": []}
    with contextlib.suppress(RuntimeError):  # the crashing app's error reaches the server
        await RequestEdge(inner, metrics, lambda p: p.startswith("/v1/"))(scope, receive, send)
    return metrics, released


def _count(metrics: GatewayMetrics, status: str) -> float:
    return metrics.requests.labels("acme", "acme/bot", status)._value.get()


async def test_a_stream_the_client_abandoned_is_counted_as_aborted() -> None:
    async def half_stream(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await receive()  # the client went away: the app stops without finishing the body

    metrics, released = await _run(half_stream, [])
    assert _count(metrics, "aborted") == 1 and _count(metrics, "200") == 0
    assert released == ["slot"]


async def test_a_crash_before_any_answer_is_a_500_and_still_releases() -> None:
    async def crash(scope, receive, send) -> None:
        raise RuntimeError("boom")

    metrics, released = await _run(crash, [])
    assert _count(metrics, "500") == 1 and released == ["slot"]
