"""An alias's weighted split at the gateway: each caller sticky to one version (its
``user``, else the session header), the same choice on every replica, the served version
in a header and a metric, and the bare base as an entry (issue 27, item 1)."""

from __future__ import annotations

import collections
import random

import pytest

from adapters_registry import AdapterVersion, SplitEntry
from gateway.tenancy.splits import SESSION_HEADER, choose
from tests.gateway.conftest import Gateway

VERSION = "x-lora-gateway-adapter-version"


@pytest.fixture
def split_env(registry_env, trained_adapters):
    registry_env.registry.push("acme", "support-bot", trained_adapters["globex"])  # v2
    return registry_env


def served(gw: Gateway, user: str | None = None, session: str | None = None) -> str:
    extra = {"user": user} if user else {}
    headers = gw.headers("acme") | ({SESSION_HEADER: session} if session else {})
    body = {"model": "support-bot", "messages": [{"role": "user", "content": "Hi"}], **extra}
    r = gw.client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.headers[VERSION]


def test_callers_keep_their_version_and_spread_by_weight(split_env, gateway_factory) -> None:
    split_env.registry.set_split("acme", "support-bot", "prod", {1: 1, 2: 1})
    gw = gateway_factory()
    first = {f"user-{i}": served(gw, user=f"user-{i}") for i in range(40)}
    assert set(first.values()) == {"acme/support-bot@v1", "acme/support-bot@v2"}
    for user, version in list(first.items())[:10]:
        assert {served(gw, user=user) for _ in range(3)} == {version}, user
    # the alias, however it is spelled, keeps the caller's version
    for spelling in ("support-bot:prod", "acme/support-bot"):
        body = {"model": spelling, "user": "user-3", "messages": [{"role": "user", "content": "Hi"}]}
        r = gw.client.post("/v1/chat/completions", json=body, headers=gw.headers("acme"))
        assert r.headers[VERSION] == first["user-3"], spelling
    # the session header is the key when the body names no user
    by_session = served(gw, session="s-1")
    assert {served(gw, session="s-1") for _ in range(3)} == {by_session}
    # another replica (its own caches) chooses the same way: the choice is the weights'
    other = gateway_factory()
    assert {u: served(other, user=u) for u in list(first)[:15]} == dict(list(first.items())[:15])
    text = gw.metrics().text
    assert 'lgw_adapter_version_requests_total{adapter="acme/support-bot",status="200",' \
           'tenant="acme",version="v2"}' in text


def test_when_weights_change_only_the_callers_they_must_move_move(split_env, gateway_factory) -> None:
    reg = split_env.registry
    reg.set_split("acme", "support-bot", "prod", {1: 1, 2: 1})
    gw = gateway_factory()
    before = {f"u{i}": served(gw, user=f"u{i}") for i in range(30)}
    reg.set_split("acme", "support-bot", "prod", {1: 3, 2: 1})  # v1 grows
    after = {u: served(gw, user=u) for u in before}
    assert all(after[u] == "acme/support-bot@v1" for u, v in before.items() if v.endswith("@v1"))
    assert sum(v.endswith("@v1") for v in after.values()) >= sum(v.endswith("@v1") for v in before.values())
    reg.set_alias("acme", "support-bot", "prod", 2)  # the split ends: everyone on v2
    assert {served(gw, user=u) for u in before} == {"acme/support-bot@v2"}


def test_the_bare_base_as_an_entry(split_env, gateway_factory) -> None:
    split_env.registry.set_split("acme", "support-bot", "prod", {1: 1, None: 1})
    gw = gateway_factory()
    seen = collections.Counter(served(gw, user=f"b{i}") for i in range(30))
    assert set(seen) == {"acme/support-bot@v1", "base"}
    user = next(f"b{i}" for i in range(30) if served(gw, user=f"b{i}") == "base")
    body = {"model": "support-bot", "user": user, "messages": [{"role": "user", "content": "Hi"}]}
    r = gw.client.post("/v1/chat/completions", json=body, headers=gw.headers("acme"))
    assert r.headers["x-lora-gateway-adapter-tier"] == "base"
    assert r.json()["model"] == "support-bot", "the caller's name is echoed, not the base's"
    assert gw.engine.serving.routes[-1].lora is None
    ledger = gw.client.app.state.ledger  # type: ignore[attr-defined]
    assert any(key[1] == "acme/support-bot@base" for key in ledger._totals), ledger._totals


def test_the_admin_api_sets_a_split_and_refuses_a_bad_one(split_env, gateway_factory) -> None:
    gw = gateway_factory(admin_api_key="lgw-admin-" + "s" * 32)
    admin = {"Authorization": "Bearer lgw-admin-" + "s" * 32}
    url = "/admin/v1/tenants/acme/adapters/support-bot/aliases/prod"
    r = gw.client.put(url, json={"weights": {"v1": 95, "v2": 5}}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json() == {"alias": "acme/support-bot:prod", "version": 1, "weights": {"v1": 95, "v2": 5}}
    r = gw.client.put(url, json={"weights": {"v1": 0, "v7": 5, "nope": 1}}, headers=admin)
    assert r.status_code == 400 and "'nope'" in r.json()["error"]["message"]
    r = gw.client.put(url, json={"weights": {"v1": 0, "v2": -1}}, headers=admin)
    assert r.status_code == 400
    assert "v1: weight 0" in r.json()["error"]["message"] and "v2: weight -1" in r.json()["error"]["message"]
    r = gw.client.put(url, json={"version": 1, "weights": {"v1": 1}}, headers=admin)
    assert r.status_code == 400
    r = gw.client.put(url, json={"version": 2}, headers=admin)
    assert r.json() == {"alias": "acme/support-bot:prod", "version": 2, "weights": None}


def _entry(version: int, weight: int) -> SplitEntry:
    v = AdapterVersion(version, "acme", "bot", version, "", {}, "base", "rev", "t", 0,
                       None)  # type: ignore[arg-type]
    return SplitEntry(v, weight)


def test_choice_follows_the_weights_and_is_a_function_of_the_caller() -> None:
    split = [_entry(1, 90), _entry(2, 10)]
    picks = collections.Counter(choose(split, "1/bot:prod", f"user-{i}").label for i in range(20000))
    assert 0.88 < picks["v1"] / 20000 < 0.92
    assert choose(split, "1/bot:prod", "alice") == choose(list(reversed(split)), "1/bot:prod", "alice")
    rng = random.Random(7)
    anonymous = collections.Counter(choose(split, "1/bot:prod", None, rng).label for _ in range(5000))
    assert 0.87 < anonymous["v1"] / 5000 < 0.93
