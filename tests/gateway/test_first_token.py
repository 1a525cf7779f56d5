"""The gateway never holds a token back: checked by structure, not by timing.

Both tests run the server exactly as ``lora-gateway serve`` does (its own listening
sockets, the draining uvicorn server, API and metrics ports) over real TCP connections,
kept alive and new. The first fails if any accepted connection lacks TCP_NODELAY (Nagle's
algorithm then holds each small SSE write until the client acknowledges the one before,
which a client delays by up to 40 ms). The second fails if the first content event waits in
the gateway for anything the engine makes after it: the fake engine makes its second output
only once the client has received the first.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.server import _draining_server, listen, serve
from loadtest.servers import free_port
from tests.gateway.conftest import make_settings
from tests.gateway.fakes import FakeEngine

_NEVER_S = 60.0  # a held-back event never arrives: this only bounds a failing test


@dataclass
class Served:
    api: str
    metrics: str
    server: uvicorn.Server
    engine: FakeEngine
    key: str


@contextmanager
def served_as_in_production(registry_env, tmp_path) -> Iterator[Served]:
    engine = FakeEngine()
    settings = make_settings(registry_env, tmp_path, port=free_port(), metrics_port=free_port())
    app = create_app(settings, engine_factory=lambda _s: engine)
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = _draining_server(config, app, grace_s=5)
    sockets = listen(settings)
    thread = threading.Thread(target=serve, args=(app, server, sockets), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{settings.port}", f"http://127.0.0.1:{settings.metrics_port}",
                     server, engine, registry_env.keys["acme"])
    finally:
        server.should_exit = True
        thread.join(15)


def _stream(client: httpx.Client, s: Served, on_first_content: threading.Event | None = None
            ) -> list[str]:
    body = {"model": "support-bot", "stream": True,
            "messages": [{"role": "user", "content": "Who are you?"}]}
    events = []
    with client.stream("POST", f"{s.api}/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {s.key}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: "):])
            if on_first_content is not None and events[-1] != "[DONE]" and any(
                    c.get("delta", {}).get("content") for c in json.loads(events[-1])["choices"]):
                on_first_content.set()
    return events


def _nodelay(server: uvicorn.Server) -> list[int]:
    """TCP_NODELAY of every connection the server holds open, as the server's sockets say."""
    flags = []
    for protocol in list(server.server_state.connections):
        sock = protocol.transport.get_extra_info("socket")
        flags.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return flags


def test_every_accepted_connection_has_tcp_nodelay(registry_env, tmp_path) -> None:
    with served_as_in_production(registry_env, tmp_path) as s, httpx.Client() as kept, \
            httpx.Client() as scraper:
        for _ in range(2):  # the second request rides the first one's connection
            assert _stream(kept, s)[-1] == "[DONE]"
        assert scraper.get(f"{s.metrics}/metrics").status_code == 200
        with httpx.Client() as fresh:
            assert _stream(fresh, s)[-1] == "[DONE]"
            flags = _nodelay(s.server)
        assert len(flags) == 3, flags  # kept-alive API, metrics, new API connection
        assert all(flags), f"connections without TCP_NODELAY: {flags}"


@pytest.mark.parametrize("connection", ["kept_alive", "new"])
def test_the_first_content_event_reaches_the_client_before_the_second_is_made(
        registry_env, tmp_path, connection: str) -> None:
    with served_as_in_production(registry_env, tmp_path) as s, httpx.Client() as client:
        received = threading.Event()

        async def wait_for_the_client() -> None:
            if not await asyncio.to_thread(received.wait, _NEVER_S):
                raise AssertionError("the client never received the first content event")

        if connection == "kept_alive":
            assert _stream(client, s)[-1] == "[DONE]"  # opens the connection
        s.engine.serving.after_first_content = wait_for_the_client
        events = _stream(client if connection == "kept_alive" else httpx.Client(), s, received)
        assert received.is_set()
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events


def test_nothing_on_the_inference_path_hops_to_a_worker_thread(gw) -> None:
    """FastAPI runs a plain ``def`` endpoint or dependency in its thread pool: a thread hop
    (half a millisecond and more under load) before the request even reaches the engine."""
    from fastapi.routing import APIRoute

    def sync_calls(dependant, where: str) -> list[str]:
        found = [] if inspect.iscoroutinefunction(dependant.call) else [f"{where}: {dependant.call}"]
        for sub in dependant.dependencies:
            found += sync_calls(sub, where)
        return found

    routes = [r for r in gw.client.app.routes if isinstance(r, APIRoute)
              and r.path in ("/v1/chat/completions", "/v1/completions", "/v1/models")]
    assert len(routes) == 3
    offenders = [call for r in routes for call in sync_calls(r.dependant, r.path)]
    assert not offenders, offenders
