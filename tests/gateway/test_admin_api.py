"""The admin API: its own identity, the registry's operations, one error envelope."""

from __future__ import annotations

ADMIN = "a" * 40


def admin(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_admin_api_is_absent_without_a_configured_key(gw) -> None:
    r = gw.client.get("/admin/v1/tenants", headers=admin())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_only_the_admin_key_opens_it(gateway_factory) -> None:
    gw = gateway_factory(admin_api_key=ADMIN)
    assert gw.client.get("/admin/v1/tenants").status_code == 401
    assert gw.client.get("/admin/v1/tenants", headers=gw.headers("acme")).status_code == 401
    r = gw.client.get("/admin/v1/tenants", headers=admin())
    assert r.status_code == 200 and r.json()["data"] == ["acme", "globex"]


def test_tenant_onboarding_and_key_lifecycle(gateway_factory) -> None:
    gw = gateway_factory(admin_api_key=ADMIN)
    c = gw.client
    assert c.post("/admin/v1/tenants", json={"name": "initech"}, headers=admin()).status_code == 201
    dup = c.post("/admin/v1/tenants", json={"name": "initech"}, headers=admin())
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "conflict"
    bad = c.post("/admin/v1/tenants", json={"name": "Bad Name"}, headers=admin())
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    key = c.post("/admin/v1/tenants/initech/keys", json={"expires_in_days": 1},
                 headers=admin()).json()["key"]
    models = c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert models.status_code == 200
    assert c.delete(f"/admin/v1/tenants/initech/keys/{key[:10]}", headers=admin()).json() == {
        "revoked": 1}
    listed = c.get("/admin/v1/tenants/initech/keys", headers=admin()).json()["data"]
    assert listed[0]["revoked_at"] is not None and key not in str(listed)
    assert c.get("/admin/v1/tenants/nobody/keys", headers=admin()).status_code == 404


def test_alias_moves_through_the_admin_api_are_served_and_audited(gateway_factory, tiny_base,
                                                                   tiny_template, tmp_path) -> None:
    from tests.conftest import train_tiny_adapter

    gw = gateway_factory(admin_api_key=ADMIN, resolve_ttl_seconds=0.0)
    gw.env.registry.push("acme", "support-bot", train_tiny_adapter(
        tiny_base, tiny_template, "v2", tmp_path / "v2", tmp_path, seed=9))
    url = "/admin/v1/tenants/acme/adapters/support-bot"
    assert gw.client.put(f"{url}/aliases/prod", json={"version": 2}, headers=admin()).status_code == 200
    content = gw.chat("acme", "support-bot").json()["choices"][0]["message"]["content"]
    assert content.startswith("acme/support-bot@v2")
    refused = gw.client.delete(f"{url}/versions/2", headers=admin())
    assert refused.status_code == 409 and "move them first" in refused.json()["error"]["message"]
    assert gw.client.post(f"{url}/versions/1/deprecate", headers=admin()).status_code == 200
    assert gw.client.put(f"{url}/aliases/prod", json={"version": 1},
                         headers=admin()).status_code == 409
    adapters = gw.client.get("/admin/v1/tenants/acme/adapters", headers=admin()).json()["data"]
    assert adapters[0]["aliases"] == {"prod": 2}
    audit = gw.client.get("/admin/v1/audit?subject=acme/support-bot", headers=admin()).json()["data"]
    assert [(e["actor"], e["action"]) for e in audit[:2]] == [("admin", "version.deprecate"),
                                                              ("admin", "alias.set")]
    report = gw.client.post("/admin/v1/gc", json={"dry_run": True}, headers=admin()).json()
    assert report["dry_run"] is True and report["orphans"] == []
