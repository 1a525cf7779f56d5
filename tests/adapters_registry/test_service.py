"""Registry service: registration is all-or-nothing, versions immutable, ids stable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_registry import AdapterTemplate, Catalog, Registry
from adapters_registry.db import AdapterRow, AdapterVersionRow, ApiKeyRow
from adapters_registry.errors import (
    AuthenticationError,
    ChecksumMismatchError,
    ConflictError,
    IncompatibleAdapterError,
    NotFoundError,
    ValidationError,
)
from tests.conftest import copy_adapter

# The same suite on the embedded default and on the production database.
pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


def stored_blobs(env) -> set[Path]:
    return {p for p in (env.artifacts / "blobs").rglob("*") if p.is_file()}


def rows(env, model) -> list:
    with Session(env.registry.db) as s:
        return list(s.scalars(select(model)))


def break_rank(d: Path) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 16
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def break_revision(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m["base_revision"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))


def to_pickle(d: Path) -> None:
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


def drop_config(d: Path) -> None:
    (d / "adapter_config.json").unlink()


def truncate(d: Path) -> None:
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


@pytest.mark.parametrize("mutate, code", [
    (break_rank, "rank_mismatch"),
    (break_revision, "base_revision_mismatch"),
    (to_pickle, "pickle_weights"),
    (drop_config, "missing_file"),
    (truncate, "invalid_safetensors"),
])
def test_rejected_push_leaves_nothing(registry_env, trained_adapters, tmp_path, mutate, code) -> None:
    bad = copy_adapter(trained_adapters["acme"], tmp_path / "bad")
    mutate(bad)
    blobs, versions, adapters = (stored_blobs(registry_env), rows(registry_env, AdapterVersionRow),
                                 rows(registry_env, AdapterRow))
    with pytest.raises(IncompatibleAdapterError) as err:
        registry_env.registry.push("acme", "newbot", bad)
    assert code in {v.code for v in err.value.violations}
    assert code in str(err.value) and "acme/newbot" in str(err.value)
    assert stored_blobs(registry_env) == blobs
    assert len(rows(registry_env, AdapterVersionRow)) == len(versions)
    assert len(rows(registry_env, AdapterRow)) == len(adapters)
    with pytest.raises(NotFoundError):
        registry_env.registry.resolve(registry_env.registry.get_tenant("acme"), "newbot")


def test_several_problems_are_all_reported(registry_env, trained_adapters, tmp_path) -> None:
    bad = copy_adapter(trained_adapters["acme"], tmp_path / "bad")
    break_rank(bad)
    break_revision(bad)
    (bad / "extra.pt").write_bytes(b"\x80\x04")
    with pytest.raises(IncompatibleAdapterError) as err:
        registry_env.registry.push("acme", "newbot", bad)
    codes = {v.code for v in err.value.violations}
    assert {"rank_mismatch", "base_revision_mismatch", "pickle_weights"} <= codes


def test_versions_are_immutable_and_ids_stable(registry_env, tiny_base, tiny_template,
                                               tmp_path) -> None:
    from tests.conftest import train_tiny_adapter

    reg = registry_env.registry
    acme = reg.get_tenant("acme")
    v1 = reg.resolve(acme, "support-bot")
    v2_dir = train_tiny_adapter(tiny_base, tiny_template, "Second version.", tmp_path / "v2",
                                tmp_path, seed=3)
    v2 = reg.push("acme", "support-bot", v2_dir, aliases=["canary"])
    assert (v1.version, v2.version) == (1, 2)
    assert v2.lora_int_id != v1.lora_int_id
    assert reg.resolve(acme, "support-bot") == v1, "default alias stays on v1"
    assert reg.resolve(acme, "support-bot:canary") == v2
    assert reg.resolve(acme, "support-bot@v2") == v2
    reg.set_alias("acme", "support-bot", "prod", 2)
    assert reg.resolve(acme, "support-bot") == v2
    reg.set_alias("acme", "support-bot", "prod", 1)  # rollback
    assert reg.resolve(acme, "support-bot") == v1
    with pytest.raises(ConflictError, match="identical content is already v2"):
        reg.push("acme", "support-bot", v2_dir)
    ids = [r.id for r in rows(registry_env, AdapterVersionRow)]
    assert len(ids) == len(set(ids))


def test_tenants_only_resolve_their_own_adapters(registry_env) -> None:
    reg = registry_env.registry
    with pytest.raises(NotFoundError):
        reg.resolve(reg.get_tenant("acme"), "pirate")
    with pytest.raises(NotFoundError):
        reg.resolve(reg.get_tenant("acme"), "../globex/pirate")
    assert [a.name for a in reg.list_adapters(reg.get_tenant("globex"))] == ["pirate"]


def test_api_keys_are_stored_only_as_hashes(registry_env) -> None:
    reg = registry_env.registry
    key = registry_env.keys["acme"]
    assert reg.authenticate(key).name == "acme"
    stored = rows(registry_env, ApiKeyRow)
    assert all(key not in (r.key_sha256, r.prefix) and len(r.key_sha256) == 64 for r in stored)
    if registry_env.db_url.startswith("sqlite"):
        db_file = Path(registry_env.db_url.removeprefix("sqlite:///"))
        assert key.encode() not in db_file.read_bytes()
    for bad in ("", "lgw-short", key[:-1] + ("A" if key[-1] != "A" else "B")):
        with pytest.raises(AuthenticationError):
            reg.authenticate(bad)


def test_fetch_verifies_every_byte(registry_env, tmp_path) -> None:
    reg = registry_env.registry
    version = reg.resolve(reg.get_tenant("globex"), "pirate")
    reg.fetch(version, tmp_path / "ok")
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == sorted(version.files)
    blob = reg.store._path(version.files["adapter_config.json"])
    blob.write_text(blob.read_text().replace("16", "17"))
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        reg.fetch(version, tmp_path / "bad")
    assert not (tmp_path / "bad" / "adapter_config.json").exists()


def test_names_are_validated(registry_env, trained_adapters) -> None:
    with pytest.raises(ValidationError):
        registry_env.registry.create_tenant("Bad Name")
    with pytest.raises(ValidationError):
        registry_env.registry.push("acme", "../escape", trained_adapters["acme"])


def test_template_needs_a_registered_base(tmp_path, db_url, tiny_contract) -> None:
    reg = Registry.open(db_url, tmp_path / "a")
    try:
        with pytest.raises(NotFoundError, match="not registered"):
            reg.register_template(AdapterTemplate(tiny_contract.model_id, tiny_contract.revision))
    finally:
        reg.close()


def test_same_revision_with_a_different_contract_is_refused(registry_env, tiny_contract) -> None:
    from dataclasses import replace

    with pytest.raises(ConflictError, match="chat_template_sha256"):
        registry_env.registry.register_base(replace(tiny_contract, chat_template_sha256="x" * 64))
    assert registry_env.registry.register_base(tiny_contract) == tiny_contract


def test_orphan_blobs_do_not_appear_as_versions(registry_env, trained_adapters, tmp_path,
                                                monkeypatch) -> None:
    """A crash between upload and commit leaves blobs but no visible version."""
    reg = registry_env.registry
    good = copy_adapter(trained_adapters["acme"], tmp_path / "good")
    (good / "README.md").write_text("new bytes, new content hash\n")

    def crash(*_a, **_k):
        raise RuntimeError("power cut")

    monkeypatch.setattr(Catalog, "insert_version", crash)  # between upload and commit
    with pytest.raises(RuntimeError):
        reg.push("acme", "crashbot", good)
    with pytest.raises(NotFoundError):
        reg.resolve(reg.get_tenant("acme"), "crashbot")
    assert "crashbot" not in {a.name for a in reg.list_adapters(reg.get_tenant("acme"))}
    shutil.rmtree(good)


def test_keys_can_be_revoked_and_expire(registry_env) -> None:
    from datetime import UTC, datetime, timedelta

    reg = registry_env.registry
    key = registry_env.keys["acme"]
    other = reg.create_api_key("acme")
    expired = reg.create_api_key("acme", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    future = reg.create_api_key("acme", expires_at=datetime.now(UTC) + timedelta(days=1))
    assert reg.authenticate(future).name == "acme"
    with pytest.raises(AuthenticationError):
        reg.authenticate(expired)
    assert reg.revoke_api_key("acme", key[:10]) == 1
    with pytest.raises(AuthenticationError):
        reg.authenticate(key)
    assert reg.authenticate(other).name == "acme", "other keys keep working"
    with pytest.raises(NotFoundError):
        reg.revoke_api_key("acme", key[:10])  # already revoked
    with pytest.raises(NotFoundError):
        reg.revoke_api_key("globex", other[:10])  # not globex's key
    with pytest.raises(ValidationError):
        reg.revoke_api_key("acme", "lgw-")
    listed = reg.list_api_keys("acme")
    assert [k.prefix for k in listed] == [k[:10] for k in (key, other, expired, future)]
    assert listed[0].revoked_at is not None and listed[1].revoked_at is None
    assert listed[2].expires_at is not None and listed[2].expires_at < datetime.now(UTC)


def test_version_lifecycle_and_audit(registry_env, tiny_base, tiny_template, tmp_path) -> None:
    from tests.conftest import train_tiny_adapter

    reg = registry_env.registry
    reg.actor = "alice"
    acme = reg.get_tenant("acme")
    v2 = reg.push("acme", "support-bot",
                  train_tiny_adapter(tiny_base, tiny_template, "two", tmp_path / "v2", tmp_path, seed=2))
    with pytest.raises(ConflictError, match=r"alias\(es\) \['prod'\]"):
        reg.delete_version("acme", "support-bot", 1)
    with pytest.raises(ConflictError, match="alias"):
        reg.deprecate_version("acme", "support-bot", 1)
    reg.set_alias("acme", "support-bot", "prod", 2)
    reg.deprecate_version("acme", "support-bot", 1)
    assert reg.resolve(acme, "support-bot@v1").version == 1, "deprecated stays servable by @vN"
    with pytest.raises(ConflictError, match="deprecated"):
        reg.set_alias("acme", "support-bot", "canary", 1)
    reg.delete_version("acme", "support-bot", 1)
    with pytest.raises(NotFoundError):
        reg.resolve(acme, "support-bot@v1")
    with pytest.raises(NotFoundError):
        reg.delete_version("acme", "support-bot", 1)
    assert reg.list_adapters(acme)[0].versions == [2]
    v3 = reg.push("acme", "support-bot",
                  train_tiny_adapter(tiny_base, tiny_template, "three", tmp_path / "v3", tmp_path, seed=3))
    assert v3.version == 3 and v3.lora_int_id > v2.lora_int_id, "numbers and ids never reused"

    entries = reg.audit_log(subject_prefix="acme/support-bot")
    actions = [(e.action, e.subject) for e in reversed(entries)]
    assert actions == [
        ("version.register", "acme/support-bot@v1"),
        ("version.register", "acme/support-bot@v2"),
        ("alias.set", "acme/support-bot:prod"),
        ("version.deprecate", "acme/support-bot@v1"),
        ("version.delete", "acme/support-bot@v1"),
        ("version.register", "acme/support-bot@v3"),
    ]
    alias_move = next(e for e in entries if e.action == "alias.set")
    assert alias_move.actor == "alice" and alias_move.details == {"previous": 1, "version": 2}
    assert all(e.at.tzinfo is not None for e in entries)
    assert {e.action for e in reg.audit_log()} >= {"tenant.create", "key.create", "base.register",
                                                    "template.register"}


def test_gc_collects_orphans_after_the_grace_period(registry_env, trained_adapters, tmp_path,
                                                    monkeypatch) -> None:
    from datetime import timedelta

    reg = registry_env.registry
    before = stored_blobs(registry_env)
    crashed = copy_adapter(trained_adapters["acme"], tmp_path / "crashed")
    (crashed / "README.md").write_text("orphan to be\n")

    def crash(*_a, **_k):
        raise RuntimeError("power cut")

    with monkeypatch.context() as m:
        m.setattr(Catalog, "insert_version", crash)  # between upload and commit
        with pytest.raises(RuntimeError):
            reg.push("acme", "crashbot", crashed)
    orphans = stored_blobs(registry_env) - before
    assert len(orphans) == 1, "only the new README blob; the rest were already stored"

    young = reg.collect_garbage()  # default grace: a push may still be in flight
    assert young.orphans == [] and young.kept_young == 1
    audited = len(reg.audit_log(limit=1000))
    dry = reg.collect_garbage(grace=timedelta(0), dry_run=True)
    assert dry.orphans == [p.name for p in orphans] and stored_blobs(registry_env) - before == orphans
    assert len(reg.audit_log(limit=1000)) == audited, "a dry run changes nothing"
    done = reg.collect_garbage(grace=timedelta(0))
    assert done.orphans == dry.orphans and stored_blobs(registry_env) == before
    for tenant, model in (("acme", "support-bot"), ("globex", "pirate")):
        reg.fetch(reg.resolve(reg.get_tenant(tenant), model), tmp_path / tenant)  # still whole
    assert reg.audit_log(limit=1)[0].action == "gc.run"
