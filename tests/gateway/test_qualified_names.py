"""Affinity keys: an owner may name its adapter ``tenant/name…``; nobody else learns anything."""

from __future__ import annotations

import pytest

from gateway.tenancy.directory import _AffinityKeys
from tests.msp import loaded, scrape


@pytest.mark.parametrize("model", ["acme/support-bot", "acme/support-bot:prod", "acme/support-bot@v1"])
def test_an_owner_may_use_the_qualified_name(gw, model: str) -> None:
    response = gw.chat("acme", model)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model  # echoed as sent
    assert body["choices"][0]["message"]["content"].startswith("acme/support-bot@v1 says")


@pytest.mark.parametrize("model", [
    "globex/pirate",          # exists, but is another tenant's
    "globex/pirate@v1",
    "globex/pirate:prod",
    "globex/no-such-bot",     # another tenant's namespace, nothing there
    "nobody/pirate",          # no such tenant
    "acme/no-such-bot",       # the caller's own namespace, nothing there
    "ACME/support-bot",       # malformed reads like unknown
    "acme/support-bot/x",
    "acme/",
    "/support-bot",
])
def test_anything_else_is_the_same_404_as_a_name_that_does_not_exist(gw, model: str) -> None:
    response = gw.chat("acme", model)
    unknown = gw.chat("acme", "no-such-bot")
    assert response.status_code == unknown.status_code == 404
    expected = unknown.json()["error"]
    expected["message"] = expected["message"].replace("`no-such-bot`", f"`{model}`")
    assert response.json()["error"] == expected
    assert response.headers.get("content-type") == unknown.headers.get("content-type")


def test_metrics_list_the_version_and_each_qualified_key_that_resolved_to_it(gw) -> None:
    for model in ("support-bot", "acme/support-bot:prod", "acme/support-bot@v1"):
        assert gw.chat("acme", model).status_code == 200
    names = set(loaded(scrape(gw.metrics().text)))
    # Never a bare "support-bot": that string means a different adapter for each tenant.
    assert names == {"acme/support-bot@v1", "acme/support-bot", "acme/support-bot:prod"}


def test_a_key_follows_its_alias_and_memory_stays_bounded() -> None:
    keys = _AffinityKeys(max_keys=2)
    keys.note("acme/bot", "acme/bot@v1")
    keys.note("acme/bot:canary", "acme/bot@v1")
    assert keys.keys("acme/bot@v1") == ["acme/bot", "acme/bot:canary"]
    keys.note("acme/bot", "acme/bot@v2")  # the alias moved
    assert keys.keys("acme/bot@v1") == ["acme/bot:canary"]
    assert keys.keys("acme/bot@v2") == ["acme/bot"]
    keys.note("acme/bot@v2", "acme/bot@v2")  # the version's own name is not a second key
    keys.note("acme/other", "acme/other@v1")  # a third key: the oldest one is forgotten
    assert keys.keys("acme/bot@v1") == []
    assert keys.keys("acme/bot@v2") == ["acme/bot"]
    assert keys.keys("acme/other@v1") == ["acme/other"]
