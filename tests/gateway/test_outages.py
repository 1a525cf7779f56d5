"""Outages under load (issue 25, item 9): Redis stopped, PostgreSQL cut off as a restart
looks to its clients, S3 unreachable, each while several tenants send a mixed load
(streams and not, adapters on the gateway's disk and cold ones), then given back.

Each test checks, over every answer: no 500 (a 503 only with a documented code and
Retry-After), no stream cut without an end; adapters already on the gateway keep
serving; quotas fail as configured; and afterwards the gateway's state adds up (nothing
in flight, nothing pinned or queued, no lease left behind, request counters equal to the
answers the load got), and a replica started during the outage becomes ready once the
service is back. Each prints its timeline (statuses per second; run with -s).
The engine is tests.gateway.fakes' (the services are what is under test); the registry
is PostgreSQL, the store S3 (moto's server) and the quota store Redis, all real.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from sqlalchemy import create_engine, text

from adapters_registry import DatabaseUnreachableError, Registry, TenantLimits
from gateway.app import create_app
from tests.conftest import POSTGRES_URL, populate
from tests.gateway.conftest import make_settings
from tests.gateway.fakes import FakeEngine
from tests.gateway.outages import Call, Cut, Load, RedisServer, running, timeline, wait_for
from tests.integration.conftest import free_port

BEFORE_S, OUTAGE_S, AFTER_S = 3.0, 4.0, 4.0
COLD = 40  # acme's adapters beyond support-bot: more than the gateway's 1 MiB disk cache keeps (16)


@dataclass
class World:
    root: Path
    registry: Registry  # direct connections: the test's own view, never cut
    db_url: str  # the gateway's: through ``pg``
    pg: Cut
    s3: Cut
    redis: RedisServer
    bucket: str
    keys: dict[str, str]
    cold: list[str]
    disk_budget: int

    def settings(self, **overrides):
        env = type("Env", (), {"db_url": self.db_url, "artifacts": f"s3://{self.bucket}/lgw",
                               "contract": self.registry.get_base("tiny-llama"), "base": self.base})
        values = dict(s3_endpoint_url=f"http://{self.s3.url_host}", redis_url=self.redis.url,
                      resolve_ttl_seconds=2.0, disk_cache_max_bytes=self.disk_budget,
                      metrics_port=None, admin_api_key="a" * 40, replica_name=uuid.uuid4().hex[:8],
                      pinned_adapters=["acme/support-bot", "globex/pirate"])
        values.update(overrides)
        return make_settings(env, self.root / uuid.uuid4().hex[:8], **values)

    base: object = None


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}"), 60, "the S3 server started")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


@pytest.fixture
def world(tmp_path, s3_server, monkeypatch, tiny_base, tiny_contract, tiny_template,
          trained_adapters) -> Iterator[World]:
    from tests.integration.test_peer_failures import make_variant

    for var, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, value)
    schema = f"lgw_outage_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    pg, s3 = Cut(5432), Cut(s3_server)
    redis = RedisServer(tmp_path)
    bucket = f"lgw-{uuid.uuid4().hex[:8]}"
    direct_s3 = f"http://127.0.0.1:{s3_server}"
    import boto3

    boto3.client("s3", endpoint_url=direct_s3).create_bucket(Bucket=bucket)
    options = f"?options=-csearch_path%3D{schema}"
    registry = Registry.open(POSTGRES_URL + options, f"s3://{bucket}/lgw", s3_endpoint_url=direct_s3)
    try:
        keys = populate(registry, tiny_contract, tiny_template, trained_adapters)
        cold = []
        for k in range(COLD):
            name = f"cold-{k}"
            registry.push("acme", name, make_variant(trained_adapters["acme"], tmp_path / name, k),
                          template_id=tiny_template.template_id)
            cold.append(name)
        # acme meets Redis on every request (rpm, concurrency); globex has no limits.
        registry.set_limits("acme", TenantLimits(rpm=100_000, concurrency=8))
        gateway_url = POSTGRES_URL.replace("127.0.0.1:5432", pg.url_host) + options
        w = World(tmp_path, registry, gateway_url, pg, s3, redis, bucket, keys, cold,
                  disk_budget=1 << 20, base=tiny_base)
        yield w
    finally:
        registry.close()
        pg.close()
        s3.close()
        redis.stop()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class Replica:
    """One gateway (fake engine) served by uvicorn in a thread, as ``lora-gateway serve``
    would: its lifespan runs in the server, so a start can wait for a service."""

    def __init__(self, settings) -> None:
        self.engine = FakeEngine()
        self.app = create_app(settings, engine_factory=lambda _s: self.engine)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def sample(self, name: str, **labels: str) -> float:
        value = self.app.state.services.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def answers_counted(self) -> float:
        registry = self.app.state.services.metrics.registry
        return sum(s.value for m in registry.collect() if m.name == "lgw_requests"
                   for s in m.samples if s.name == "lgw_requests_total")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the replica did not stop"


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for r in made:
        r.stop()


def mix(w: World) -> list[tuple[str, str, str, bool]]:
    warm = [("acme", w.keys["acme"], "support-bot", False), ("globex", w.keys["globex"], "pirate", False)]
    return warm * 2 + [("acme", w.keys["acme"], name, True) for name in w.cold]


def outage(w: World, replicas: list[Replica], take, give, *, title: str, needed_to_start: bool,
           **settings) -> tuple[Replica, Replica, list[Call], tuple[float, float]]:
    """Serve a load, take the service away for OUTAGE_S, start a second replica while it
    is away, give it back; (replica, late replica, calls, (outage start, end) in the
    load's seconds).

    ``needed_to_start``: the late replica may not be ready before the service is back
    (the registry's database); else it must be ready while it is away."""
    first = Replica(w.settings(**settings))
    replicas.append(first)
    wait_for(first.ready, 60, "the first replica is ready")
    for tenant, model in (("acme", "support-bot"), ("globex", "pirate")):  # warm before the outage
        r = chat(first.url, w.keys[tenant], model)
        assert r.status_code == 200, r.text
    # An answer is counted once sent, a moment after its client has read it.
    wait_for(lambda: first.answers_counted() == 2, 10, "the two warm-up answers are counted")
    load = Load(first.url, mix(w))
    with running(load):
        time.sleep(BEFORE_S)
        down_at = load.now()
        take()
        late = Replica(w.settings(**settings))
        replicas.append(late)
        if needed_to_start:
            time.sleep(OUTAGE_S)
            assert not late.ready(), "a replica became ready without its registry"
        else:
            took = wait_for(late.ready, OUTAGE_S, "a replica started during the outage is ready")
            time.sleep(max(0.0, OUTAGE_S - took))
        up_at = load.now()
        give()
        if needed_to_start:
            took = wait_for(late.ready, 60, "the replica started during the outage is ready")
        time.sleep(AFTER_S)
    calls = load.calls
    print("\n" + timeline(calls, {"outage": (down_at, up_at)}, title))
    when = "after the service came back" if needed_to_start else "after it started, during the outage"
    print(f"replica started during the outage: ready {took:.1f}s {when}")
    # Every answer accounted, nothing left held.
    wait_for(lambda: first.sample("lgw_requests_in_flight") == 0, 10, "nothing in flight")
    failed = [c for c in calls if not c.status]
    assert not failed, failed[:5]
    wait_for(lambda: first.answers_counted() - 2 == len(calls), 10,
             f"the gateway counted the {len(calls)} answers the load got")
    assert first.sample("lgw_admitted_in_flight") == 0
    assert first.sample("lgw_queue_depth", tenant="acme") == 0
    engine = first.app.state.services.adapters.cache_state()["engine"]
    assert engine["loading"] == 0 and all(a["in_use"] == 0 for a in engine["adapters"]), engine
    # No concurrency lease is left in Redis (acme's limit has one per request in flight).
    # (An empty set is no key at all; acme's request bucket, beside it, shows where to look.)
    with redis.Redis.from_url(w.redis.url) as r:
        assert list(r.scan_iter("lgw:quota:*:requests")), "acme's quota keys are not where expected"
        held = {key: r.zcard(key) for key in r.scan_iter("lgw:quota:*:leases")}
    assert not any(held.values()), held
    return first, late, calls, (down_at, up_at)


def chat(url: str, key: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)


def check_answers(calls: list[Call], allowed_503: set[str]) -> None:
    assert calls, "the load sent nothing"
    broken = [c for c in calls if c.status == 0 or (c.status >= 500 and c.status != 503)]
    assert not broken, broken[:5]
    assert not [c for c in calls if c.status == 503 and c.code not in allowed_503], \
        [c for c in calls if c.status == 503 and c.code not in allowed_503][:5]
    assert not [c for c in calls if not c.complete], [c for c in calls if not c.complete][:5]


def warm_served_throughout(calls: list[Call]) -> None:
    warm = [c for c in calls if not c.cold]
    assert warm and all(c.status == 200 for c in warm), [c for c in warm if c.status != 200][:5]


def after(calls: list[Call], up_at: float, grace_s: float) -> list[Call]:
    return [c for c in calls if c.t > up_at + grace_s]


def test_redis_stopped_quotas_fail_open_and_leases_come_back(world: World, replicas) -> None:
    first, _, calls, _ = outage(world, replicas, world.redis.stop, world.redis.start,
                             title="Redis stopped (quota_failure_mode=open)", needed_to_start=False,
                             quota_failure_mode="open")
    check_answers(calls, allowed_503=set())
    warm_served_throughout(calls)
    assert all(c.status == 200 for c in calls), [c for c in calls if c.status != 200][:5]
    assert first.sample("lgw_quota_backend_errors_total", outcome="failed_open") > 0
    # The new Redis is empty: acme's limits are counted afresh there, and enforced.
    world.registry.set_limits("acme", TenantLimits(rpm=1))
    wait_for(lambda: chat(first.url, world.keys["acme"], "support-bot").status_code == 429, 10,
             "acme's new limit is enforced in the new Redis")


def test_redis_stopped_quotas_fail_closed_as_configured(world: World, replicas) -> None:
    _, _, calls, (down_at, up_at) = outage(world, replicas, world.redis.stop, world.redis.start,
                                           title="Redis stopped (quota_failure_mode=closed)",
                                           needed_to_start=False, quota_failure_mode="closed")
    check_answers(calls, allowed_503={"overloaded"})  # "Rate limits cannot be checked right now"
    refused = [c for c in calls if c.status == 503]
    assert refused and {c.tenant for c in refused} == {"acme"}  # globex has no limits: not asked
    assert all(c.status == 200 for c in calls if c.tenant == "globex")
    assert all(down_at - 0.5 < c.t < up_at + 2 for c in refused)
    assert all(c.status == 200 for c in after(calls, up_at, 2))


def test_postgres_restarted_cached_names_keep_serving(world: World, replicas) -> None:
    _, _, calls, (_, up_at) = outage(world, replicas, world.pg.down, world.pg.up,
                                     title="PostgreSQL cut off (a restart)", needed_to_start=True)
    check_answers(calls, allowed_503={"database_unavailable", "adapter_unavailable"})
    warm_served_throughout(calls)
    assert all(c.status == 200 for c in after(calls, up_at, 3))


def test_s3_unreachable_cached_adapters_keep_serving(world: World, replicas) -> None:
    _, late, calls, (_, up_at) = outage(world, replicas, world.s3.down, world.s3.up,
                                        title="S3 unreachable", needed_to_start=False)
    check_answers(calls, allowed_503={"adapter_unavailable"})
    warm_served_throughout(calls)
    cold_out = [c for c in calls if c.cold and c.status == 503]
    assert cold_out, "no cold adapter was asked for while S3 was away"
    assert all(c.status == 200 for c in after(calls, up_at, 2))
    # The replica that started without its store pins its adapters once the store is back.
    services = late.app.state.services
    wait_for(lambda: not services.warmup_errors, 35, "the late replica's start-up pins are done")
    assert services.adapters.cache_state()["pinned"] == ["acme/support-bot@v1", "globex/pirate@v1"]


def test_tenants_are_told_the_registry_is_away_not_where_it_is(gateway_factory, monkeypatch) -> None:
    """A tenant's 503 names no database host, user or store endpoint (the log does); the
    operator's admin API says it all."""
    where = "database postgresql+psycopg://lgw@db-7.internal:5432/registry"

    def away(*_args: object, **_kwargs: object) -> None:
        raise DatabaseUnreachableError(f"{where}: it is unreachable (connection refused)")

    gw = gateway_factory(admin_api_key="a" * 40)
    services = gw.client.app.state.services
    monkeypatch.setattr(services.tenants._registry, "authenticate_until", away)
    monkeypatch.setattr(services.admin_registry, "list_tenants", away)
    r = gw.chat("acme", "support-bot")  # the key's first lookup: nothing to fall back on
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == {
        "message": "the gateway cannot reach its registry database right now; retry shortly",
        "type": "server_error", "param": None, "code": "database_unavailable"}
    admin = gw.client.get("/admin/v1/tenants", headers={"Authorization": "Bearer " + "a" * 40})
    assert admin.status_code == 503 and where in admin.json()["error"]["message"]


def test_a_start_waits_for_an_unreachable_database_only_as_long_as_configured(world: World) -> None:
    from gateway.startup import open_registry

    world.pg.down()
    started = time.monotonic()
    with pytest.raises(DatabaseUnreachableError):
        asyncio.run(open_registry(world.settings(startup_wait_seconds=1.0)))
    assert 1.0 <= time.monotonic() - started < 5
    world.pg.up()
    registry, contract = asyncio.run(open_registry(world.settings(startup_wait_seconds=0)))
    registry.close()
    assert contract.model_id == "tiny-llama"
