"""Tenancy: tenants, their API keys (and authentication by key), their limits."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from adapters_registry import keys
from adapters_registry._audit import record
from adapters_registry.changes import Change, publish
from adapters_registry.db import ApiKeyRow, TenantLimitsRow, TenantRow, as_utc, as_utc_or_none
from adapters_registry.errors import ConflictError, NotFoundError, ValidationError
from adapters_registry.limits import LIMITS, TenantLimits
from adapters_registry.names import shown, validate_name
from adapters_registry.records import ApiKeyInfo, Tenant


class Tenancy:
    """Tenants, keys and limits in the registry database; ``actor`` signs the audit trail."""

    def __init__(self, db: Engine, *, actor: str) -> None:
        self.db = db
        self.actor = actor

    def create_tenant(self, name: str) -> Tenant:
        validate_name("tenant", name)
        with Session(self.db) as s, s.begin():
            if s.scalar(select(TenantRow).filter_by(name=name)) is not None:
                raise ConflictError(f"tenant {shown(name)} already exists")
            row = TenantRow(name=name)
            s.add(row)
            s.flush()
            record(s, self.actor, "tenant.create", name)
            return Tenant(row.id, row.name)

    def get_tenant(self, name: str) -> Tenant:
        with Session(self.db) as s:
            row = s.scalar(select(TenantRow).filter_by(name=name))
            if row is None:
                raise NotFoundError(f"tenant {shown(name)} does not exist")
            return Tenant(row.id, row.name)

    def list_tenants(self) -> list[Tenant]:
        with Session(self.db) as s:
            return [Tenant(r.id, r.name) for r in s.scalars(select(TenantRow).order_by(TenantRow.name))]

    def create_api_key(self, tenant_name: str, *, expires_at: datetime | None = None) -> str:
        """A new key for the tenant. Only its hash is stored: the caller must show it once."""
        tenant = self.get_tenant(tenant_name)
        key = keys.new_api_key()
        with Session(self.db) as s, s.begin():
            s.add(ApiKeyRow(tenant_id=tenant.id, key_sha256=keys.key_hash(key),
                            prefix=key[:keys.SHOWN_PREFIX], expires_at=expires_at))
            record(s, self.actor, "key.create", tenant.name, prefix=key[:keys.SHOWN_PREFIX],
                   expires_at=expires_at.isoformat() if expires_at else None)
        return key

    def list_api_keys(self, tenant_name: str) -> list[ApiKeyInfo]:
        tenant = self.get_tenant(tenant_name)
        with Session(self.db) as s:
            return [ApiKeyInfo(r.prefix, as_utc(r.created_at), as_utc_or_none(r.expires_at),
                               as_utc_or_none(r.revoked_at))
                    for r in s.scalars(select(ApiKeyRow).filter_by(tenant_id=tenant.id)
                                       .order_by(ApiKeyRow.id))]

    def revoke_api_key(self, tenant_name: str, prefix: str) -> int:
        """Revoke the tenant's active keys that start with ``prefix``; returns how many."""
        tenant = self.get_tenant(tenant_name)
        if len(prefix) < keys.SHOWN_PREFIX:
            raise ValidationError(f"give at least the first {keys.SHOWN_PREFIX} characters of the key")
        with Session(self.db) as s, s.begin():
            rows = [r for r in s.scalars(select(ApiKeyRow).filter_by(
                tenant_id=tenant.id, prefix=prefix[:keys.SHOWN_PREFIX], revoked_at=None))]
            if not rows:
                raise NotFoundError(f"tenant {shown(tenant.name)} has no active key starting {shown(prefix)}")
            for r in rows:
                r.revoked_at = datetime.now(UTC)
            record(s, self.actor, "key.revoke", tenant.name, prefix=prefix[:keys.SHOWN_PREFIX])
            publish(s, Change("keys", tenant.id, tenant.name))
        return len(rows)

    def authenticate(self, api_key: str) -> Tenant:
        return self.authenticate_until(api_key)[0]

    def authenticate_until(self, api_key: str) -> tuple[Tenant, datetime | None]:
        """The key's tenant and when the key expires (UTC; None: never). A cache of the answer
        must not outlive that time: expiry publishes no change notice."""
        digest = keys.key_hash(keys.check_format(api_key))
        with Session(self.db) as s:
            row = s.execute(
                select(TenantRow.id, TenantRow.name, ApiKeyRow.expires_at)
                .join(ApiKeyRow, ApiKeyRow.tenant_id == TenantRow.id)
                .where(ApiKeyRow.key_sha256 == digest, ApiKeyRow.revoked_at.is_(None))
            ).first()
        # Expiry is compared here, in UTC, so SQLite's naive datetimes cannot mislead SQL.
        if row is None or (row.expires_at is not None and as_utc(row.expires_at) <= datetime.now(UTC)):
            raise keys.invalid_key()
        return Tenant(row.id, row.name), as_utc_or_none(row.expires_at)

    def set_limits(self, tenant_name: str, limits: TenantLimits) -> TenantLimits:
        """Replace the tenant's quotas and weight (None fields: the gateway's defaults)."""
        problems = limits.problems()
        if problems:
            raise ValidationError(f"invalid limits for tenant {shown(tenant_name)}: {'; '.join(problems)}")
        tenant = self.get_tenant(tenant_name)
        with Session(self.db) as s, s.begin():
            row = s.get(TenantLimitsRow, tenant.id)
            if row is None:
                row = TenantLimitsRow(tenant_id=tenant.id)
                s.add(row)
            for spec in LIMITS:
                setattr(row, spec.name, getattr(limits, spec.name))
            row.updated_at = datetime.now(UTC)
            record(s, self.actor, "limits.set", tenant.name, **asdict(limits))
            publish(s, Change("limits", tenant.id, tenant.name))
        return limits

    def get_limits(self, tenant_name: str) -> TenantLimits:
        """The tenant's own quotas and weight; all None when none were ever set."""
        tenant = self.get_tenant(tenant_name)
        with Session(self.db) as s:
            row = s.get(TenantLimitsRow, tenant.id)
            if row is None:
                return TenantLimits()
            return TenantLimits(**{spec.name: getattr(row, spec.name) for spec in LIMITS})


__all__ = ["Tenancy"]
