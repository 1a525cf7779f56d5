from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.config import GatewaySettings
from loadtest.servers import free_port
from tests.gateway.fakes import FakeEngine

METRICS_PORT = 9400  # the test gateways' metrics port (TestClient: http://testserver:9400)


@dataclass
class Gateway:
    client: TestClient
    engine: FakeEngine
    env: object
    deaths: list[int]

    def headers(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env.keys[tenant]}"}  # type: ignore[attr-defined]

    def metrics(self):
        """GET /metrics where this gateway serves it: its metrics port (as the test gateways
        run), else the API port with the admin key."""
        settings = self.client.app.state.services.settings  # type: ignore[attr-defined]
        if settings.metrics_port is not None:
            return self.client.get(f"http://testserver:{settings.metrics_port}/metrics")
        key = settings.admin_api_key
        return self.client.get("/metrics", headers={"Authorization": f"Bearer {key.get_secret_value()}"}
                               if key else {})

    def chat(self, tenant: str, model: str, content: str = "Who are you?", **extra):
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        return self.client.post("/v1/chat/completions", json=body, headers=self.headers(tenant))


def make_settings(env, tmp_path, **overrides) -> GatewaySettings:
    values = dict(database_url=env.db_url, artifacts_dir=str(env.artifacts),
                  cache_dir=tmp_path / "gateway-cache", base_model_id=env.contract.model_id,
                  base_model_dir=env.base.path, resolve_ttl_seconds=0.0, max_model_len=256,
                  max_cpu_loras=4, max_loras=2, metrics_port=METRICS_PORT)
    values.update(overrides)
    return GatewaySettings(**values)


@pytest.fixture
def gateway_factory(registry_env, tmp_path):
    made: list[TestClient] = []

    def make(**overrides) -> Gateway:
        engine = FakeEngine()
        deaths: list[int] = []
        app = create_app(make_settings(registry_env, tmp_path, **overrides),
                         engine_factory=lambda _s: engine,
                         on_engine_dead=lambda: deaths.append(1))
        client = TestClient(app)
        client.__enter__()
        made.append(client)
        return Gateway(client, engine, registry_env, deaths)

    yield make
    for client in made:
        client.__exit__(None, None, None)


@pytest.fixture
def gw(gateway_factory) -> Iterator[Gateway]:
    yield gateway_factory()


@contextmanager
def serving(app: FastAPI, **config: Any) -> Iterator[str]:
    """``app`` behind a real uvicorn server in a thread (lifespan included); yields its URL.

    ``config``: more ``uvicorn.Config`` arguments (quiet by default).
    """
    port = free_port()
    config = {"log_level": "warning", **config}
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
