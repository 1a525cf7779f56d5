"""Two gateway replicas on one PostgreSQL registry stay consistent: changes are pushed
(LISTEN/NOTIFY) and seen within a second despite a 30 s resolve TTL; with the channel
cut they are seen within the TTL, the outage is logged and metered, and it recovers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters_registry import TenantLimits
from adapters_registry.changes import CHANNEL_SQL, listen_params
from gateway.observability.metrics import GatewayMetrics
from gateway.tenancy.invalidation import ChangeListener
from lora_gateway.cli import main
from tests.conftest import copy_adapter
from tests.gateway.test_admin_api import ADMIN, admin

on_postgres = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
PUSHED_WITHIN_S = 1.0


def metric(gw, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(gw.metrics().text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def channel_up(gw) -> float | None:
    return metric(gw, "lgw_invalidation_channel_up", channel="postgres")


def notices(gw, kind: str) -> float:
    return metric(gw, "lgw_invalidation_notices_total", kind=kind) or 0.0


def until(check: Callable[[], bool], deadline: float, what: str) -> None:
    while not check():
        assert time.monotonic() < deadline, f"not seen in time: {what}"
        time.sleep(0.02)


def replicas(gateway_factory, n: int = 2, **settings) -> list:
    gws = [gateway_factory(**settings) for _ in range(n)]
    for gw in gws:
        until(lambda gw=gw: channel_up(gw) == 1, time.monotonic() + 10, "channel up")
    return gws


def answer(gw, key: str, model: str = "support-bot") -> str:
    r = gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": model, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def status(gw, key: str) -> int:
    return gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "support-bot", "messages": [{"role": "user", "content": "Hi"}]}
                          ).status_code


@pytest.fixture
def two_versions(registry_env, trained_adapters, tmp_path):
    """acme/support-bot v1 (prod) and v2, and a spare acme key to revoke."""
    reg = registry_env.registry
    reg.push("acme", "support-bot", copy_adapter(trained_adapters["globex"], tmp_path / "v2"))
    return reg, reg.create_api_key("acme")


@on_postgres
def test_alias_moves_key_revocations_and_limits_reach_both_replicas_within_a_second(
        gateway_factory, registry_env, two_versions) -> None:
    reg, spare = two_versions
    key = registry_env.keys["acme"]
    gws = replicas(gateway_factory, resolve_ttl_seconds=30.0, admin_api_key=ADMIN)
    for gw in gws:  # every answer below is now cached for 30 s on both replicas
        assert "acme/support-bot@v1" in answer(gw, key)
        assert status(gw, spare) == 200

    # An alias move through replica 0's admin API.
    r = gws[0].client.put("/admin/v1/tenants/acme/adapters/support-bot/aliases/prod",
                          json={"version": 2}, headers=admin())
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + PUSHED_WITHIN_S
    for gw in gws:
        until(lambda gw=gw: "acme/support-bot@v2" in answer(gw, key), deadline, "alias move")

    # A key revocation by the operator's CLI, not through any gateway.
    assert main(["registry", "revoke-key", "--db", registry_env.db_url, "--artifacts",
                 str(registry_env.artifacts), "acme", spare[:12]]) == 0
    deadline = time.monotonic() + PUSHED_WITHIN_S
    for gw in gws:
        until(lambda gw=gw: status(gw, spare) == 401, deadline, "key revocation")
    assert "acme/support-bot@v2" in answer(gws[1], key)  # the tenant's other key still works

    # A limit change: one request a minute, so each replica refuses its second one.
    reg.set_limits("acme", TenantLimits(rpm=1))
    deadline = time.monotonic() + PUSHED_WITHIN_S
    for gw in gws:
        until(lambda gw=gw: status(gw, key) == 429, deadline, "rpm limit")
        assert {kind: notices(gw, kind) for kind in ("alias", "keys", "limits")} == {
            "alias": 1, "keys": 1, "limits": 1}


@on_postgres
def test_with_the_channel_cut_changes_arrive_within_the_ttl_then_it_recovers(
        gateway_factory, registry_env, two_versions, caplog) -> None:
    reg, spare = two_versions
    key, ttl = registry_env.keys["acme"], 2.0
    gws = replicas(gateway_factory, resolve_ttl_seconds=ttl, registry_changes_retry_seconds=6.0)
    for gw in gws:
        assert "acme/support-bot@v1" in answer(gw, key)
    caplog.set_level(logging.INFO, logger="gateway.tenancy.invalidation")
    with psycopg.connect(**listen_params(reg.db), autocommit=True) as conn:
        for gw in gws:
            pid = gw.client.app.state.registry_changes.backend_pid
            assert conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
    for gw in gws:
        until(lambda gw=gw: channel_up(gw) == 0, time.monotonic() + 1, "channel down")

    reg.set_alias("acme", "support-bot", "prod", 2)
    deadline = time.monotonic() + ttl + 0.3
    for gw in gws:
        until(lambda gw=gw: "acme/support-bot@v2" in answer(gw, key), deadline, "alias move by TTL")
        assert channel_up(gw) == 0 and notices(gw, "alias") == 0  # the TTL did it, not a notice
    down = [r for r in caplog.records if "channel down" in r.getMessage()]
    assert len(down) == 2 and all(r.levelno == logging.ERROR for r in down)  # once per replica

    # Reconnected (after the 6 s retry delay), everything cached is dropped once (notices
    # sent meanwhile were lost) and changes are pushed again.
    for gw in gws:
        until(lambda gw=gw: channel_up(gw) == 1, time.monotonic() + 15, "channel back")
        assert notices(gw, "all") == 2  # the first connection, and the reconnection
    assert len([r for r in caplog.records if "channel back after" in r.getMessage()]) == 2
    for gw in gws:
        assert status(gw, spare) == 200
    reg.revoke_api_key("acme", spare[:12])
    deadline = time.monotonic() + PUSHED_WITHIN_S
    for gw in gws:
        until(lambda gw=gw: status(gw, spare) == 401, deadline, "key revocation after recovery")


@on_postgres
def test_an_unreadable_notice_drops_everything_and_the_listener_carries_on(
        gateway_factory, registry_env, two_versions, caplog) -> None:
    reg, _ = two_versions
    key = registry_env.keys["acme"]
    [gw] = replicas(gateway_factory, 1, resolve_ttl_seconds=30.0)
    assert "acme/support-bot@v1" in answer(gw, key)
    with psycopg.connect(**listen_params(reg.db)) as conn:  # one transaction
        # An alias moved behind the registry's back, announced in words no replica reads:
        # only dropping everything makes the move visible.
        conn.execute("UPDATE aliases SET version_id = (SELECT max(id) FROM adapter_versions)")
        conn.execute(f"SELECT pg_notify({CHANNEL_SQL}, 'garbage')")
    until(lambda: notices(gw, "unreadable") == 1, time.monotonic() + PUSHED_WITHIN_S,
          "unreadable notice")
    assert "acme/support-bot@v2" in answer(gw, key)
    assert any("unreadable notice" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)
    reg.set_alias("acme", "support-bot", "prod", 1)  # the channel still works
    until(lambda: "acme/support-bot@v1" in answer(gw, key), time.monotonic() + PUSHED_WITHIN_S,
          "alias move after an unreadable notice")


def test_on_sqlite_there_is_no_channel_and_the_log_says_so(gateway_factory, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway.tenancy.invalidation")
    gw = gateway_factory(resolve_ttl_seconds=5.0)
    assert gw.client.app.state.registry_changes is None
    assert channel_up(gw) is None  # no series: nothing to alert on for a single replica
    assert any("no push channel, the registry database is not PostgreSQL" in r.getMessage()
               and "(5s)" in r.getMessage() for r in caplog.records)


def test_a_channel_that_stays_down_is_logged_once_and_metered(monkeypatch, caplog) -> None:
    attempts: list[dict] = []

    async def refuse(*args, **params):
        attempts.append(params)
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", refuse)
    metrics = GatewayMetrics()

    async def main() -> None:
        listener = ChangeListener({"host": "db", "connect_timeout": 3}, lambda _: None, metrics,
                                  ttl=5, retry_s=0.01)
        listener.start()
        while len(attempts) < 4:
            await asyncio.sleep(0.01)
        await listener.stop()

    asyncio.run(main())
    assert metrics.registry.get_sample_value("lgw_invalidation_channel_up", {"channel": "postgres"}) == 0
    down = [r.getMessage() for r in caplog.records if "channel down" in r.getMessage()]
    assert len(down) == 1 and "connection refused" in down[0] and "TTL (5s)" in down[0]
    # The database URL's own settings win over the listener's defaults.
    assert attempts[0] == {"autocommit": True, "host": "db", "connect_timeout": 3,
                           "application_name": "lora-gateway changes"}
