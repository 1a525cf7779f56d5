"""The tenant isolation matrix: every tenant x every other tenant's adapter, by every name
that reaches it (name, aliases, version, qualified forms) x every endpoint a tenant key
reaches. 0 leaks: each answer is exactly the answer for a name of the same form that
exists nowhere (status, body, header names), and /v1/models lists only the tenant's own.

initech's adapter has the same name as acme's (``support-bot``): each must get its own.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from adapters_registry import Registry
from gateway.api.admin import router as admin_router
from gateway.app import create_app
from tests.conftest import RegistryEnv, populate
from tests.gateway.conftest import make_settings
from tests.gateway.fakes import FakeEngine

ADMIN_KEY = "i" * 40
OWNED = {"acme": "support-bot", "globex": "pirate", "initech": "support-bot"}
NOWHERE = ("nobody", "ghost")  # a tenant and an adapter that do not exist
FORMS = ("{name}", "{name}:prod", "{name}:canary", "{name}@v1", "{tenant}/{name}",
         "{tenant}/{name}:prod", "{tenant}/{name}@v1")
ENDPOINTS = ("chat", "chat-stream", "completions", "completions-stream", "responses",
             "responses-stream", "tokenize", "detokenize")
# What differs between two answers for reasons other than the name asked for.
VOLATILE_HEADERS = {"x-request-id", "content-length", "date"}


@dataclass
class World:
    client: TestClient
    keys: dict[str, str]
    engine: FakeEngine

    def call(self, tenant: str, endpoint: str, model: str) -> Any:
        kind, _, stream = endpoint.partition("-")
        body: dict[str, Any] = {"model": model, "max_tokens": 4, "stream": bool(stream)}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": "Who are you?"}]
            path = "/v1/chat/completions"
        elif kind == "responses":
            body = {"model": model, "max_output_tokens": 4, "stream": bool(stream),
                    "input": "Who are you?"}
            path = "/v1/responses"
        elif kind in ("tokenize", "detokenize"):
            body = {"model": model, **({"prompt": "Who are you?"} if kind == "tokenize"
                                       else {"tokens": [87, 104, 111]})}
            path = f"/{kind}"
        else:
            body["prompt"] = "Who are you?"
            path = "/v1/completions"
        return self.client.post(path, json=body, headers=self.auth(tenant))

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base, tiny_contract, tiny_template, trained_adapters) -> Iterator[World]:
    root = tmp_path_factory.mktemp("isolation")
    registry = Registry.open(f"sqlite:///{root / 'registry.db'}", root / "artifacts")
    keys = populate(registry, tiny_contract, tiny_template, trained_adapters)
    registry.create_tenant("initech")
    keys["initech"] = registry.create_api_key("initech")
    registry.push("initech", "support-bot", trained_adapters["globex"])
    for tenant, name in OWNED.items():
        registry.set_alias(tenant, name, "canary", 1)
    env = RegistryEnv(registry, f"sqlite:///{root / 'registry.db'}", root / "artifacts", keys,
                      tiny_base, tiny_contract, tiny_template)
    engine = FakeEngine()
    app = create_app(make_settings(env, root, admin_api_key=ADMIN_KEY),
                     engine_factory=lambda _s: engine)
    with TestClient(app) as client:
        yield World(client, keys, engine)
    registry.close()


def cells() -> Iterator[Any]:
    for attacker in OWNED:
        for victim, name in OWNED.items():
            if victim == attacker:
                continue
            for form in FORMS:
                if "{tenant}" not in form and name == OWNED[attacker]:
                    continue  # the attacker's own adapter of the same name: not a leak
                ref = form.format(tenant=victim, name=name)
                control = form.format(tenant=NOWHERE[0], name=NOWHERE[1])
                for endpoint in ENDPOINTS:
                    yield pytest.param(attacker, ref, control, endpoint,
                                       id=f"{attacker}->{ref}->{endpoint}")


def normalized(response: Any, model: str) -> tuple[int, Any, set[str]]:
    """Status, body with the asked-for name blanked, and the header names."""
    body = response.json() if response.headers["content-type"].startswith("application/json") \
        else response.text
    text = repr(body).replace(model, "<model>")
    return response.status_code, text, set(response.headers) - VOLATILE_HEADERS


@pytest.mark.parametrize(("attacker", "ref", "control", "endpoint"), list(cells()))
def test_another_tenants_adapter_is_a_name_that_exists_nowhere(world: World, attacker: str, ref: str,
                                                               control: str, endpoint: str) -> None:
    leak = world.call(attacker, endpoint, ref)
    nowhere = world.call(attacker, endpoint, control)
    assert nowhere.status_code == 404, nowhere.text
    assert nowhere.json()["error"]["code"] == "model_not_found"
    assert normalized(leak, ref) == normalized(nowhere, control)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_comparison_tells_a_served_name_from_a_missing_one(world: World, endpoint: str) -> None:
    """The matrix above can fail: the tenant's own adapter does not read as a missing one."""
    own = world.call("globex", endpoint, "pirate:canary")
    nowhere = world.call("globex", endpoint, "ghost:canary")
    assert own.status_code == 200, own.text
    assert normalized(own, "pirate:canary") != normalized(nowhere, "ghost:canary")


STORED_CALLS = ("retrieve", "continue", "cancel")


def stored_call(world: World, tenant: str, how: str, response_id: str) -> Any:
    if how == "retrieve":
        return world.client.get(f"/v1/responses/{response_id}", headers=world.auth(tenant))
    if how == "cancel":
        return world.client.post(f"/v1/responses/{response_id}/cancel", headers=world.auth(tenant))
    return world.client.post("/v1/responses", headers=world.auth(tenant), json={
        "model": OWNED[tenant], "input": "and then?", "previous_response_id": response_id})


@pytest.mark.parametrize("how", STORED_CALLS)
@pytest.mark.parametrize(("attacker", "victim"), list(itertools.permutations(OWNED, 2)))
def test_another_tenants_stored_response_is_an_id_that_exists_nowhere(
        world: World, attacker: str, victim: str, how: str) -> None:
    made = world.call(victim, "responses", OWNED[victim])
    assert made.status_code == 200, made.text
    rid = made.json()["id"]
    assert stored_call(world, victim, "retrieve", rid).status_code == 200  # it is stored
    control = "resp_" + "0" * (len(rid) - len("resp_"))
    leak, nowhere = (stored_call(world, attacker, how, r) for r in (rid, control))
    assert nowhere.status_code == 404, nowhere.text
    assert nowhere.json()["error"]["code"] == "response_not_found"
    assert normalized(leak, rid) == normalized(nowhere, control)


def test_each_tenant_is_served_its_own_adapter_of_a_shared_name(world: World) -> None:
    answers = {t: world.call(t, "chat", "support-bot") for t in ("acme", "initech")}
    for tenant, r in answers.items():
        assert r.status_code == 200, (tenant, r.text)
    loaded = {lora.name for lora in world.engine.loaded.values()}
    assert {"acme/support-bot@v1", "initech/support-bot@v1"} <= loaded, loaded
    texts = {t: r.json()["choices"][0]["message"]["content"] for t, r in answers.items()}
    assert texts["acme"] != texts["initech"], texts


@pytest.mark.parametrize("tenant", list(OWNED))
def test_models_lists_only_the_tenants_own(world: World, tenant: str) -> None:
    r = world.client.get("/v1/models", headers=world.auth(tenant))
    assert r.status_code == 200, r.text
    cards = r.json()["data"]
    adapters = {c["id"] for c in cards if c.get("root")}
    name = OWNED[tenant]
    assert adapters == {name, f"{name}:prod", f"{name}:canary", f"{name}@v1"}
    assert {c["owned_by"] for c in cards if c.get("root")} == {tenant}
    others = {t for t in OWNED if t != tenant}
    assert not [c for c in cards if any(o in repr(c) for o in others)], cards


def admin_cells() -> Iterator[Any]:
    for route in admin_router.routes:
        assert isinstance(route, APIRoute)
        for method in sorted(route.methods):
            for attacker, victim in itertools.permutations(OWNED, 2):
                yield pytest.param(attacker, method, route.path, victim,
                                   id=f"{attacker}->{method} {route.path}->{victim}")


def fill(path: str, tenant: str, name: str, key_prefix: str) -> str:
    values = {"tenant": tenant, "name": name, "alias": "prod", "version": "1", "prefix": key_prefix,
              "action": "pause"}
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


@pytest.mark.parametrize(("attacker", "method", "path", "victim"), list(admin_cells()))
def test_admin_routes_refuse_tenant_keys_alike(world: World, attacker: str, method: str, path: str,
                                               victim: str) -> None:
    victims_key = world.keys[victim][:10]  # the prefix the admin API names a key by
    ask = world.client.request(method, fill(path, victim, OWNED[victim], victims_key), json={},
                               headers=world.auth(attacker))
    nowhere = world.client.request(method, fill(path, *NOWHERE, "lgw_nothin"), json={},
                                   headers=world.auth(attacker))
    assert ask.status_code == 401, ask.text
    assert normalized(ask, victim) == normalized(nowhere, NOWHERE[0])
