"""The registry: one facade over its services, for the commands and the admin API.

Each responsibility is a service of its own, over one database and one artifact store:

- ``catalog.Catalog``: bases, templates, adapters, versions, aliases, and what a
  tenant's ``model`` resolves to;
- ``tenancy.Tenancy``: tenants, API keys (and authentication by key), limits;
- ``artifacts.Artifacts``: an adapter's files: push (intake, check, upload), fetch,
  verify and repair, garbage collection;
- ``rollouts.Rollouts``: a candidate version's progressive rollout under an alias;
- ``files.Files``, ``jobs.Jobs`` and ``job_queue.JobQueue``: fine-tuning through the
  API, the tenant's files and jobs, and the workers' queue;
- ``_audit``: the audit trail every change writes in its own transaction.

``Registry`` composes them and forwards to them, nothing more. Code that needs one
responsibility takes that service (or a protocol naming what it calls), not the facade.

Synchronous on purpose (SQLAlchemy sessions, file copies): async callers run it in a
worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import Engine

from adapters_registry._audit import AuditEntry
from adapters_registry._audit import read as read_audit
from adapters_registry.artifacts import Artifacts, GcReport, VerifyReport
from adapters_registry.catalog import Catalog
from adapters_registry.compat import Limits
from adapters_registry.contract import BaseContract
from adapters_registry.database import current_revision, head_revision, make_engine
from adapters_registry.errors import ConflictError
from adapters_registry.files import Files
from adapters_registry.job_queue import JobQueue
from adapters_registry.jobs import Jobs
from adapters_registry.limits import TenantLimits
from adapters_registry.locations import open_store
from adapters_registry.names import ModelRef
from adapters_registry.records import AdapterInfo, AdapterVersion, ApiKeyInfo, Resolution, Tenant
from adapters_registry.rollouts import Rollouts
from adapters_registry.store import ArtifactStore
from adapters_registry.template import AdapterTemplate
from adapters_registry.tenancy import Tenancy
from adapters_registry.usage import Ledger, UsageRecord


class Registry:
    """The registry's services over one database and store; ``actor`` names whoever
    operates it, for the audit trail."""

    def __init__(self, db: Engine, store: ArtifactStore, limits: Limits | None = None,
                 *, actor: str = "unknown") -> None:
        # The SQLAlchemy engine of the registry database (not the inference engine).
        self.db = db
        self.store = store
        self.tenancy = Tenancy(db, actor=actor)
        self.catalog = Catalog(db, self.tenancy, actor=actor)
        self.artifacts = Artifacts(db, store, limits or Limits(), self.catalog, self.tenancy,
                                   actor=actor)
        self.ledger = Ledger(db)
        # Progressive delivery: callers use the service itself (registry.rollouts.start(...)).
        self.rollouts = Rollouts(db, self.catalog, self.tenancy, actor=actor)
        # Fine-tuning through the API: the tenant's files and jobs, and the workers' queue.
        self.files = Files(db, store, self.tenancy)
        self.jobs = Jobs(db, self.catalog, self.tenancy, self.files, actor=actor)
        self.job_queue = JobQueue(db, actor=actor)
        self._actor = actor

    @property
    def limits(self) -> Limits:
        """What an intake accepts (archive and file sizes): the artifacts service's."""
        return self.artifacts.limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self.artifacts.limits = limits

    @property
    def actor(self) -> str:
        return self._actor

    @actor.setter
    def actor(self, actor: str) -> None:
        """Who the audit trail names for every change made from now on, by any service."""
        self._actor = actor
        for service in (self.tenancy, self.catalog, self.artifacts, self.rollouts, self.jobs,
                        self.job_queue):
            service.actor = actor

    @classmethod
    def open(cls, db_url: str, artifacts: str | Path, *, actor: str = "unknown",
             s3_endpoint_url: str | None = None, s3_region: str = "us-east-1",
             db_lock_timeout_s: float = 10.0, migrate: bool = True) -> Registry:
        """``artifacts`` is a folder or ``s3://bucket/prefix``. Without ``migrate`` the schema
        must already be current (``lora-gateway registry migrate``), else ConflictError."""
        store = open_store(artifacts, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
        engine = make_engine(db_url, migrate=migrate, lock_timeout_s=db_lock_timeout_s)
        if not migrate:
            at, head = current_revision(engine), head_revision()
            if at != head:
                engine.dispose()
                raise ConflictError(f"the registry database is at schema revision {at or 'none'}, "
                                    f"this version needs {head}: run `lora-gateway registry migrate`")
        return cls(engine, store, actor=actor)

    def close(self) -> None:
        self.db.dispose()

    # -- catalog ---------------------------------------------------------------------

    def register_base(self, contract: BaseContract) -> BaseContract:
        return self.catalog.register_base(contract)

    def get_base(self, model_id: str, revision: str | None = None) -> BaseContract:
        return self.catalog.get_base(model_id, revision)

    def register_template(self, template: AdapterTemplate) -> AdapterTemplate:
        return self.catalog.register_template(template)

    def get_template(self, template_id: str) -> AdapterTemplate:
        return self.catalog.get_template(template_id)

    def set_alias(self, tenant_name: str, name: str, alias: str, version: int) -> None:
        self.catalog.set_alias(tenant_name, name, alias, version)

    def deprecate_version(self, tenant_name: str, name: str, version: int) -> None:
        self.catalog.deprecate_version(tenant_name, name, version)

    def delete_version(self, tenant_name: str, name: str, version: int) -> None:
        self.catalog.delete_version(tenant_name, name, version)

    def set_split(self, tenant_name: str, name: str, alias: str,
                  weights: Mapping[int | None, int]) -> None:
        self.catalog.set_split(tenant_name, name, alias, weights)

    def resolve(self, tenant: Tenant, model: str | ModelRef) -> AdapterVersion:
        return self.catalog.resolve(tenant, model)

    def resolve_split(self, tenant: Tenant, model: str | ModelRef) -> Resolution:
        return self.catalog.resolve_split(tenant, model)

    def generation(self) -> int:
        return self.catalog.generation()

    def list_adapters(self, tenant: Tenant) -> list[AdapterInfo]:
        return self.catalog.list_adapters(tenant)

    # -- tenancy ---------------------------------------------------------------------

    def create_tenant(self, name: str) -> Tenant:
        return self.tenancy.create_tenant(name)

    def get_tenant(self, name: str) -> Tenant:
        return self.tenancy.get_tenant(name)

    def list_tenants(self) -> list[Tenant]:
        return self.tenancy.list_tenants()

    def create_api_key(self, tenant_name: str, *, expires_at: datetime | None = None) -> str:
        return self.tenancy.create_api_key(tenant_name, expires_at=expires_at)

    def list_api_keys(self, tenant_name: str) -> list[ApiKeyInfo]:
        return self.tenancy.list_api_keys(tenant_name)

    def revoke_api_key(self, tenant_name: str, prefix: str) -> int:
        return self.tenancy.revoke_api_key(tenant_name, prefix)

    def authenticate(self, api_key: str) -> Tenant:
        return self.tenancy.authenticate(api_key)

    def authenticate_until(self, api_key: str) -> tuple[Tenant, datetime | None]:
        return self.tenancy.authenticate_until(api_key)

    def set_limits(self, tenant_name: str, limits: TenantLimits) -> TenantLimits:
        return self.tenancy.set_limits(tenant_name, limits)

    def get_limits(self, tenant_name: str) -> TenantLimits:
        return self.tenancy.get_limits(tenant_name)

    # -- artifacts -------------------------------------------------------------------

    def push(self, tenant_name: str, name: str, source: Path, *, template_id: str | None = None,
             base: str | None = None, aliases: Iterable[str] = ()) -> AdapterVersion:
        return self.artifacts.push(tenant_name, name, source, template_id=template_id, base=base,
                                   aliases=aliases)

    def intake_limits(self, template_id: str | None = None, base: str | None = None) -> Limits:
        return self.artifacts.intake_limits(template_id, base)

    def fetch(self, version: AdapterVersion, dest: Path) -> None:
        self.artifacts.fetch(version, dest)

    def verify_blobs(self, *, repair_from: Path | None = None) -> VerifyReport:
        return self.artifacts.verify_blobs(repair_from=repair_from)

    def collect_garbage(self, *, grace: timedelta = timedelta(hours=1),
                        dry_run: bool = False) -> GcReport:
        keep = self.files.referenced_blobs() | self.jobs.referenced_blobs()
        return self.artifacts.collect_garbage(grace=grace, dry_run=dry_run, keep=keep)

    # -- audit -----------------------------------------------------------------------

    def audit_log(self, *, subject_prefix: str | None = None, limit: int = 100) -> list[AuditEntry]:
        return read_audit(self.db, subject_prefix=subject_prefix, limit=limit)

    # -- usage ledger (adapters_registry.usage) -------------------------------------------

    def record_usage(self, writer: str, records: Iterable[UsageRecord]) -> None:
        self.ledger.record_usage(writer, records)

    def usage(self, start: datetime, end: datetime, *, tenant: str | None = None) -> list[UsageRecord]:
        return self.ledger.usage(start, end, tenant=tenant)


__all__ = ["Registry"]
