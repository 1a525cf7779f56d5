"""Failure isolation and lifecycle on the fake engine: a client that leaves, a drain.

The fake OpenAI layer here generates slowly and keeps a set of the requests it is running
(as vLLM's output processor does), so a test can see whether the gateway let go of a
request whose client disconnected, streamed or not. The ASGI app is driven directly, in
the TestClient's own event loop, with a ``receive`` that disconnects on cue.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.engine.base import Route, ServingResult
from tests.gateway.conftest import Gateway


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


def test_an_engine_request_aborted_before_any_output_still_counts_its_prompt() -> None:
    # A non-streamed request gets vLLM's outputs only when it finishes: its client leaving
    # mid-generation must not make its prompt free.
    from gateway.engine.base import Meter
    from gateway.engine.openai import _metered

    async def never_outputs() -> AsyncIterator[Any]:
        await asyncio.sleep(3600)
        yield None

    async def leave(meter: Meter) -> None:
        task = asyncio.ensure_future(anext(_metered(never_outputs(), meter, True, 7, "r1")))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait((task,))

    meter = Meter()
    asyncio.run(leave(meter))
    assert meter.prompt_tokens == {"r1": 7} and meter.total_completion_tokens == 0
