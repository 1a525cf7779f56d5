"""Change notices: every mutation that changes a resolution, keys or limits publishes one,
in its own transaction (PostgreSQL NOTIFY), and a notice parses back or is refused clearly."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.orm import Session

from adapters_registry import TenantLimits
from adapters_registry.changes import CHANNEL_SQL, Change, listen_params, publish
from adapters_registry.errors import ConflictError, ValidationError
from tests.conftest import copy_adapter


@pytest.mark.parametrize("change", [
    Change("alias", 3, "acme", "support-bot"),
    Change("version", 1, "a", "b"),
    Change("adapter", 7, "globex", "pirate"),
    Change("keys", 2, "acme"),
    Change("limits", 2, "acme"),
])
def test_a_notice_parses_back_to_its_change(change: Change) -> None:
    assert Change.parse(change.payload()) == change


def notice(**fields) -> str:
    return json.dumps({"format": 1, "kind": "alias", "tenant_id": 1, "tenant": "acme",
                       "adapter": "bot"} | fields)


@pytest.mark.parametrize(("payload", "says"), [
    ("not json", "not JSON"),
    ("[1, 2]", "not format 1"),
    (notice(format=2), "not format 1"),
    (notice(kind="rename"), "kind must be one of"),
    (notice(tenant_id="1"), "tenant_id must be an integer"),
    (notice(tenant_id=True), "tenant_id must be an integer"),
    (notice(tenant=""), "tenant must be a name"),
    (notice(adapter=None), "adapter must be a name for a 'alias' change"),
    (notice(kind="keys"), "adapter must be null for a 'keys' change"),
    (notice(kind="nope", tenant_id=None), "kind must be one of"),
])
def test_a_bad_notice_is_a_clear_validation_error(payload: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Change.parse(payload)


def test_a_change_names_an_adapter_exactly_when_its_kind_is_about_one() -> None:
    with pytest.raises(ValueError, match="names an adapter"):
        Change("keys", 1, "acme", "bot")
    with pytest.raises(ValueError, match="names an adapter"):
        Change("alias", 1, "acme")


def test_sqlite_has_no_channel(registry_env) -> None:
    assert listen_params(registry_env.registry.db) is None
    registry_env.registry.set_alias("acme", "support-bot", "canary", 1)  # publishes nothing, fine


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_every_mutation_that_changes_what_replicas_cache_publishes_on_commit(
        registry_env, trained_adapters, tmp_path) -> None:
    reg, acme = registry_env.registry, registry_env.registry.get_tenant("acme")
    with psycopg.connect(**listen_params(reg.db), autocommit=True) as conn:
        channel = conn.execute(f"SELECT {CHANNEL_SQL}").fetchone()[0]
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

        def received() -> list[Change]:
            return [Change.parse(n.payload) for n in conn.notifies(timeout=0.5)]

        reg.push("acme", "support-bot", copy_adapter(trained_adapters["globex"], tmp_path / "v2"))
        assert received() == [Change("version", acme.id, "acme", "support-bot")]
        reg.set_alias("acme", "support-bot", "prod", 2)
        assert received() == [Change("alias", acme.id, "acme", "support-bot")]
        reg.deprecate_version("acme", "support-bot", 1)
        reg.delete_version("acme", "support-bot", 1)
        assert received() == [Change("version", acme.id, "acme", "support-bot")] * 2
        key = reg.create_api_key("acme")
        assert received() == []  # a new key makes no cached answer stale
        reg.revoke_api_key("acme", key[:12])
        assert received() == [Change("keys", acme.id, "acme")]  # the tenant, never the key
        reg.set_limits("acme", TenantLimits(rpm=5))
        assert received() == [Change("limits", acme.id, "acme")]
        with pytest.raises(ConflictError):
            reg.delete_version("acme", "support-bot", 2)  # refused: prod points at it
        assert received() == []
        # A notice is part of its transaction: sent on commit, never on rollback.
        change = Change("adapter", acme.id, "acme", "support-bot")
        with Session(reg.db) as s:
            with s.begin():
                publish(s, change)
                assert received() == []  # not before the commit
            assert received() == [change]
            with s.begin():
                publish(s, change)
                s.rollback()
        assert received() == []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_each_registry_schema_has_a_channel_of_its_own(registry_env) -> None:
    # Notices are database-wide; the channel is per schema, so parallel registries (and
    # test runs) in one database never see each other's changes.
    with psycopg.connect(**listen_params(registry_env.registry.db), autocommit=True) as conn:
        ours = conn.execute(f"SELECT {CHANNEL_SQL}").fetchone()[0]
    with psycopg.connect(**(listen_params(registry_env.registry.db) | {"options": ""})) as conn:
        public = conn.execute(f"SELECT {CHANNEL_SQL}").fetchone()[0]
    assert ours != public and len(ours) < 64


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_every_published_change_bumps_the_generation_once_and_only_on_commit(
        registry_env, trained_adapters, tmp_path) -> None:
    # The gateway's caches trust everything they hold while two readings are equal
    # (gateway.tenancy.freshness): every change they could hold stale must move it.
    reg = registry_env.registry
    acme = reg.get_tenant("acme")
    seen = [reg.generation()]

    def moved() -> int:
        seen.append(reg.generation())
        return seen[-1] - seen[-2]

    reg.push("acme", "support-bot", copy_adapter(trained_adapters["globex"], tmp_path / "v2"))
    assert moved() == 1
    reg.set_alias("acme", "support-bot", "prod", 2)
    reg.deprecate_version("acme", "support-bot", 1)
    assert moved() == 2
    key = reg.create_api_key("acme")
    reg.resolve(acme, "support-bot:prod")
    reg.authenticate(key)
    assert moved() == 0  # reads and new keys make nothing cached stale
    reg.revoke_api_key("acme", key[:12])
    reg.set_limits("acme", TenantLimits(rpm=5))
    assert moved() == 2
    with pytest.raises(ConflictError):
        reg.delete_version("acme", "support-bot", 2)  # refused: prod points at it
    with Session(reg.db) as s, s.begin():
        publish(s, Change("adapter", acme.id, "acme", "support-bot"))
        s.rollback()
    assert moved() == 0
