"""Each registry service works on its own, given only the services it depends on: tenancy
on the database alone, the catalog on tenancy, artifacts on both and a store. The facade
(``Registry``) composes exactly these and adds nothing."""

from __future__ import annotations

import pytest

from adapters_registry import (
    Artifacts,
    Catalog,
    FilesystemStore,
    Limits,
    NotFoundError,
    Registry,
    Tenancy,
    TenantLimits,
)
from adapters_registry.database import make_engine
from adapters_registry.usage import Ledger
from tests.conftest import copy_adapter


@pytest.fixture
def services(tmp_path):
    db = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    tenancy = Tenancy(db, actor="t")
    catalog = Catalog(db, tenancy, actor="t")
    artifacts = Artifacts(db, FilesystemStore(tmp_path / "blobs"), Limits(), catalog, tenancy,
                          actor="t")
    yield tenancy, catalog, artifacts
    db.dispose()


def test_tenancy_alone_keeps_tenants_keys_and_limits(services) -> None:
    tenancy, _, _ = services
    acme = tenancy.create_tenant("acme")
    key = tenancy.create_api_key("acme")
    assert tenancy.authenticate(key) == acme
    assert tenancy.set_limits("acme", TenantLimits(rpm=5)) == tenancy.get_limits("acme")


def test_the_catalog_and_artifacts_register_resolve_and_fetch(services, tiny_contract, tiny_template,
                                                              trained_adapters, tmp_path) -> None:
    tenancy, catalog, artifacts = services
    acme = tenancy.create_tenant("acme")
    catalog.register_base(tiny_contract)
    catalog.register_template(tiny_template)
    gen = catalog.generation()
    pushed = artifacts.push("acme", "bot", copy_adapter(trained_adapters["acme"], tmp_path / "a"))
    assert catalog.generation() == gen + 1
    assert catalog.resolve(acme, "bot") == pushed
    artifacts.fetch(pushed, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(pushed.files)
    with pytest.raises(NotFoundError):
        catalog.resolve(acme, "other")
    assert artifacts.verify_blobs().problems == []


def test_the_facade_is_composition_only() -> None:
    own = {name for name, value in vars(Registry).items()
           if callable(value) and not name.startswith("__")}
    services = set(vars(Catalog)) | set(vars(Tenancy)) | set(vars(Artifacts)) | set(vars(Ledger))
    # every method but closing and the audit trail's read is a service's (``open`` is a
    # classmethod: construction)
    assert own - services == {"close", "audit_log"}
    assert len(own) > 20


def test_the_facades_actor_and_limits_are_its_services(tmp_path) -> None:
    reg = Registry(make_engine(f"sqlite:///{tmp_path / 'r.db'}"), FilesystemStore(tmp_path / "b"))
    reg.actor = "alice"
    assert {reg.tenancy.actor, reg.catalog.actor, reg.artifacts.actor} == {"alice"}
    reg.limits = Limits(max_archive_bytes=10)
    assert reg.artifacts.limits.max_archive_bytes == 10
    reg.close()
