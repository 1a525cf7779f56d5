"""Failure isolation and lifecycle on the fake engine: a client that leaves, a drain, the
artifact store (a real S3-protocol server, moto) going down.

The fake OpenAI layer here generates slowly and keeps a set of the requests it is running
(as vLLM's output processor does), so a test can see whether the gateway let go of a
request whose client disconnected, streamed or not. The ASGI app is driven directly, in
the TestClient's own event loop, with a ``receive`` that disconnects on cue.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters_registry import Registry
from gateway.api.routes import TIER_HEADER
from gateway.app import create_app
from gateway.engine.base import Route, ServingResult
from gateway.residency.disk_cache import FETCH_PREFIX
from loadtest.servers import start
from tests.conftest import ANSWERS, RegistryEnv, populate, train_tiny_adapter
from tests.gateway.conftest import Gateway, make_settings
from tests.gateway.fakes import FakeEngine
from tests.integration.conftest import GatewayProcess as ServerProcess
from tests.integration.conftest import free_port


class SlowServing:
    """Answers after ``tokens`` steps of ``step_s``, streamed or not; ``running`` is what
    it is generating right now, and ``tokens_out`` what each request produced."""

    def __init__(self, step_s: float = 0.05, tokens: int = 200) -> None:
        self.step_s = step_s
        self.tokens = tokens
        self.running: set[str] = set()
        self.tokens_out: dict[str, int] = {}
        self.started = asyncio.Event()

    async def chat(self, request: Any, route: Route) -> ServingResult:
        if request.stream:
            return self._stream(route)
        async for _ in self._generate(route):
            pass
        return {"id": route.request_id, "object": "chat.completion", "choices": []}

    async def _generate(self, route: Route) -> AsyncIterator[int]:
        rid = route.request_id
        self.running.add(rid)
        self.started.set()
        try:
            for n in range(1, self.tokens + 1):
                await asyncio.sleep(self.step_s)
                self.tokens_out[rid] = n
                route.meter.completion_tokens[(rid, 0)] = n
                yield n
        finally:
            self.running.discard(rid)  # finished or aborted: the engine forgets it

    async def _stream(self, route: Route) -> AsyncIterator[str]:
        async for n in self._generate(route):
            yield f"data: {json.dumps({'n': n})}\n\n"
        yield "data: [DONE]\n\n"


async def _call_leaving(gw: Gateway, serving: SlowServing, body: dict[str, Any],
                        leave_after_s: float) -> list[dict[str, Any]]:
    """POST ``body`` through the ASGI app as uvicorn would; the client disconnects
    ``leave_after_s`` after generation started. Returns what the app sent."""
    app = gw.client.app
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("testserver", 80),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode()),
                         (b"authorization", gw.headers("acme")["Authorization"].encode())]}
    body_sent = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await serving.started.wait()
        await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return sent


def _count(gw: Gateway, status: str, adapter: str = "acme/support-bot") -> float:
    metrics = gw.client.app.state.services.metrics
    return metrics.requests.labels("acme", adapter, status)._value.get()


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_a_client_that_leaves_stops_its_generation(gw: Gateway, stream: bool) -> None:
    assert gw.chat("acme", "support-bot").status_code == 200  # adapter resident
    serving = SlowServing()
    gw.engine.serving.chat = serving.chat  # type: ignore[method-assign]
    body = {"model": "support-bot", "max_tokens": 200, "stream": stream,
            "messages": [{"role": "user", "content": "Who are you?"}]}
    metrics = gw.client.app.state.services.metrics
    tokens = metrics.completion_tokens.labels("acme", "acme/support-bot")
    tokens_before = tokens._value.get()

    sent = gw.client.portal.call(_call_leaving, gw, serving, body, 0.3)  # type: ignore[union-attr]

    assert serving.running == set()  # aborted, not generating on for nobody
    (produced,) = serving.tokens_out.values()
    assert 0 < produced < 200
    assert _count(gw, "aborted") == 1 and _count(gw, "200") == 1  # (the first request)
    assert gw.client.app.state.services.admission.in_flight == 0  # its engine slot released
    assert metrics.in_flight._value.get() == 0
    assert tokens._value.get() - tokens_before == produced  # what was generated, not max_tokens
    if stream:
        assert sent[0]["status"] == 200 and sent[-1].get("more_body") is True  # cut short


def test_a_client_that_stays_gets_the_whole_answer(gw: Gateway) -> None:
    # The disconnect watch does not cut a request whose client waits (TestClient only
    # reports a disconnect once the answer is complete).
    serving = SlowServing(step_s=0.01, tokens=20)
    gw.engine.serving.chat = serving.chat  # type: ignore[method-assign]
    r = gw.chat("acme", "support-bot", max_tokens=20)
    assert r.status_code == 200 and serving.tokens_out == {r.json()["id"]: 20}
    assert _count(gw, "200") == 1 and _count(gw, "aborted") == 0


def test_draining_refuses_new_inference_with_503_and_keeps_answering(gw: Gateway) -> None:
    gw.client.app.state.services.draining = True  # what the first SIGTERM does
    r = gw.chat("acme", "support-bot")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert error["code"] == "overloaded" and "shutting down" in error["message"]
    assert gw.client.get("/health/ready").status_code == 503
    assert gw.client.get("/health/live").status_code == 200
    assert gw.client.get("/v1/models", headers=gw.headers("acme")).status_code == 200
    assert _count(gw, "503", adapter="-") == 1  # refused before its model was looked at


def test_streams_cut_at_the_end_of_a_drain_end_with_an_error_event(gw: Gateway) -> None:
    gw.client.app.state.services.openai.cut_streams()  # what the drain does once its grace is over
    r = gw.chat("acme", "support-bot", stream=True)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 2
    assert json.loads(events[0])["error"]["code"] == "overloaded"
    assert _count(gw, "503") == 1


def test_an_engine_request_aborted_before_any_output_still_counts_its_prompt() -> None:
    # A non-streamed request gets vLLM's outputs only when it finishes: its client leaving
    # mid-generation must not make its prompt free.
    from gateway.engine.base import Meter
    from gateway.engine.metering import metered

    async def never_outputs() -> AsyncIterator[Any]:
        await asyncio.sleep(3600)
        yield None

    async def leave(meter: Meter) -> None:
        task = asyncio.ensure_future(anext(metered(never_outputs(), meter, True, 7, "r1")))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait((task,))

    meter = Meter()
    asyncio.run(leave(meter))
    assert meter.prompt_tokens == {"r1": 7} and meter.total_completion_tokens == 0


# ---------------------------------------------------------------- artifact store down

@pytest.fixture(scope="module")
def third_adapter(tiny_base, tiny_template, tmp_path_factory) -> Path:
    """A trained adapter whose bytes differ from the two shared ones (no blob in common)."""
    root = tmp_path_factory.mktemp("third")
    return train_tiny_adapter(tiny_base, tiny_template, ANSWERS["acme"], root / "third", root,
                              seed=3)


def _moto(port: int, log: Path) -> ServerProcess:
    return start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log,
                 port=port, ready_path="/moto-api/")


def test_artifact_store_down_spares_resident_adapters(tmp_path, monkeypatch, db_url,
                                                      tiny_base, tiny_contract, tiny_template,
                                                      trained_adapters, third_adapter) -> None:
    import boto3

    for name, value in (("AWS_ACCESS_KEY_ID", "t"), ("AWS_SECRET_ACCESS_KEY", "t"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    port = free_port()
    s3 = _moto(port, tmp_path / "s3.log")
    try:
        boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket="lgw")
        registry = Registry.open(db_url, "s3://lgw/artifacts", s3_endpoint_url=s3.url)
        keys = populate(registry, tiny_contract, tiny_template, trained_adapters)
        third = registry.push("acme", "third", third_adapter)
        env = RegistryEnv(registry, db_url, "s3://lgw/artifacts", keys, tiny_base,  # type: ignore[arg-type]
                          tiny_contract, tiny_template)
        # One adapter fits in engine memory: the first one fetched ends up on disk only.
        app = create_app(make_settings(env, tmp_path, s3_endpoint_url=s3.url, max_cpu_loras=1,
                                       max_loras=1), engine_factory=lambda _s: FakeEngine())
        with TestClient(app) as client:
            gw = Gateway(client, app.state.services.openai._engine, env, [])
            assert gw.chat("acme", "support-bot").headers[TIER_HEADER] == "remote_fetch"
            assert gw.chat("globex", "pirate").headers[TIER_HEADER] == "remote_fetch"

            s3.stop()  # the artifact store is down from here on
            for tenant, model, tier in (("globex", "pirate", "slot_hit"),  # in the engine
                                        ("acme", "support-bot", "disk_hit")):  # on disk only
                r = gw.chat(tenant, model)
                assert r.status_code == 200 and r.headers[TIER_HEADER] == tier, r.text
            r = gw.chat("acme", "third")  # never fetched
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            error = r.json()["error"]
            assert error["code"] == "adapter_unavailable"
            assert error["message"] == ("adapter acme/third@v1 could not be fetched from the "
                                        "artifact store; retry shortly")
            cache = tmp_path / "gateway-cache"
            assert not (cache / third.content_sha256).exists()  # nothing cached half-way
            assert not [p for p in cache.rglob("*") if p.name.startswith(FETCH_PREFIX)]
            # Readiness is about this replica serving, and it still does (resident adapters,
            # the base): an S3 outage does not take every replica out of the pool.
            assert client.get("/health/ready").status_code == 200

            s3 = _moto(port, tmp_path / "s3-again.log")  # back, with its data (moto keeps
            boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket="lgw")  # none: put back)
            for rel, digest in third.files.items():
                registry.store.put(third_adapter / rel, digest)
            r = gw.chat("acme", "third")
            assert r.status_code == 200 and r.headers[TIER_HEADER] == "remote_fetch", r.text
        registry.close()
    finally:
        s3.stop()


def test_the_start_up_heap_is_frozen_while_serving_and_released_after(registry_env, tmp_path) -> None:
    """As vLLM's server does: the collector skips the start-up heap while the app serves."""
    import gc

    gc.unfreeze()  # whatever an earlier test froze
    app = create_app(make_settings(registry_env, tmp_path), engine_factory=lambda _s: FakeEngine())
    with TestClient(app):
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
