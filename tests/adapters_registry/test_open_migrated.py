"""Replicas that do not migrate: they open a current schema and refuse an old one, naming the fix."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from adapters_registry import Registry
from adapters_registry.database import head_revision, upgrade
from adapters_registry.errors import ConflictError


def test_open_without_migrating_needs_a_current_schema(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    with pytest.raises(ConflictError, match="run `lora-gateway registry migrate`"):
        Registry.open(url, tmp_path / "art", migrate=False)
    engine = create_engine(url)
    upgrade(engine, "0001")  # an older release's schema
    engine.dispose()
    with pytest.raises(ConflictError, match=f"at schema revision 0001.*needs {head_revision()}"):
        Registry.open(url, tmp_path / "art", migrate=False)
    Registry.open(url, tmp_path / "art").close()  # what the hook Job does
    registry = Registry.open(url, tmp_path / "art", migrate=False)
    assert registry.list_tenants() == []
    registry.close()
