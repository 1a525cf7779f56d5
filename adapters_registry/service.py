"""The registry service: bases, templates, tenants, keys, adapters, versions, aliases.

Synchronous on purpose (SQLAlchemy sessions, file copies): async callers run it in a
worker thread. Registration order is check → upload blobs → commit the row, so a
failure at any step leaves no visible version (blobs without a row are unreferenced
and harmless; collecting them is issue #3's garbage collection).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapters_registry._audit import AuditEntry, record
from adapters_registry._audit import read as read_audit
from adapters_registry._tenancy import TenancyMixin
from adapters_registry.compat import Limits, Violation, check_adapter
from adapters_registry.contract import BaseContract
from adapters_registry.db import (
    AdapterRow,
    AdapterVersionRow,
    AliasRow,
    BaseModelRow,
    TemplateRow,
    as_utc,
    current_revision,
    head_revision,
    make_engine,
)
from adapters_registry.errors import (
    ConflictError,
    IncompatibleAdapterError,
    ManifestError,
    NotFoundError,
)
from adapters_registry.hashing import sha256_file, sha256_tree
from adapters_registry.manifest import AdapterManifest
from adapters_registry.records import (
    AdapterInfo,
    AdapterVersion,
    ModelRef,
    Tenant,
    validate_name,
)
from adapters_registry.store import ArtifactStore, open_store
from adapters_registry.template import AdapterTemplate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    orphans: list[str]  # deleted, or that would be with dry_run
    kept_young: int
    referenced: int
    dry_run: bool


class Registry(TenancyMixin):
    """The registry service. ``actor`` names whoever operates it, for the audit trail."""

    def __init__(self, engine: Engine, store: ArtifactStore, limits: Limits | None = None,
                 *, actor: str = "unknown") -> None:
        self.engine = engine
        self.actor = actor
        self.store = store
        self.limits = limits or Limits()

    @classmethod
    def open(cls, db_url: str, artifacts: str | Path, *, actor: str = "unknown",
             s3_endpoint_url: str | None = None, s3_region: str = "us-east-1",
             migrate: bool = True) -> Registry:
        """``artifacts`` is a folder or ``s3://bucket/prefix``. Without ``migrate`` the schema
        must already be current (``lora-gateway registry migrate``), else ConflictError."""
        store = open_store(artifacts, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
        engine = make_engine(db_url, migrate=migrate)
        if not migrate:
            at, head = current_revision(engine), head_revision()
            if at != head:
                engine.dispose()
                raise ConflictError(f"the registry database is at schema revision {at or 'none'}, "
                                    f"this version needs {head}: run `lora-gateway registry migrate`")
        return cls(engine, store, actor=actor)

    def close(self) -> None:
        self.engine.dispose()

    # -- bases and templates -------------------------------------------------------

    def register_base(self, contract: BaseContract) -> BaseContract:
        """Idempotent for an identical contract; a different one under the same revision is refused."""
        with Session(self.engine) as s, s.begin():
            row = s.scalar(
                select(BaseModelRow).filter_by(model_id=contract.model_id, revision=contract.revision)
            )
            if row is not None:
                existing = BaseContract.from_dict(row.contract)
                if existing.mismatches(contract):
                    raise ConflictError(
                        f"base {contract.model_id}@{contract.revision[:12]} is registered with a "
                        f"different contract: {'; '.join(existing.mismatches(contract))}"
                    )
                return existing
            s.add(BaseModelRow(model_id=contract.model_id, revision=contract.revision,
                               contract=contract.to_dict()))
            record(s, self.actor, "base.register", f"{contract.model_id}@{contract.revision[:12]}")
        logger.info("registered base %s@%s", contract.model_id, contract.revision[:12])
        return contract

    def get_base(self, model_id: str, revision: str | None = None) -> BaseContract:
        with Session(self.engine) as s:
            q = select(BaseModelRow).filter_by(model_id=model_id)
            if revision is not None:
                q = q.filter_by(revision=revision)
            row = s.scalar(q.order_by(BaseModelRow.id.desc()).limit(1))
            if row is None:
                at = f"@{revision[:12]}" if revision else ""
                raise NotFoundError(f"base {model_id}{at} is not registered")
            return BaseContract.from_dict(row.contract)

    def register_template(self, template: AdapterTemplate) -> AdapterTemplate:
        with Session(self.engine) as s, s.begin():
            base = s.scalar(select(BaseModelRow).filter_by(
                model_id=template.base_model_id, revision=template.base_revision))
            if base is None:
                raise NotFoundError(
                    f"template is for base {template.base_model_id}@{template.base_revision[:12]}, "
                    "which is not registered"
                )
            if s.get(TemplateRow, template.template_id) is None:
                s.add(TemplateRow(template_id=template.template_id, base_id=base.id,
                                  fields=template.to_dict()))
                record(s, self.actor, "template.register", template.template_id,
                       **template.shape_fields())
        return template

    def get_template(self, template_id: str) -> AdapterTemplate:
        with Session(self.engine) as s:
            row = s.get(TemplateRow, template_id)
            if row is None:
                raise NotFoundError(f"template {template_id} is not registered")
            return AdapterTemplate.from_dict(row.fields)

    # -- adapters ------------------------------------------------------------------

    def push(self, tenant_name: str, name: str, adapter_dir: Path, *,
             template_id: str | None = None, aliases: Iterable[str] = ()) -> AdapterVersion:
        """Check and register a new immutable version of ``tenant/name``."""
        validate_name("adapter", name)
        aliases = [validate_name("alias", a) for a in aliases]
        tenant = self.get_tenant(tenant_name)
        ref = f"{tenant.name}/{name}"
        with tempfile.TemporaryDirectory(prefix="lgw-stage-") as tmp:
            # Check and upload one private copy, so the files cannot change in between.
            staged = Path(tmp) / "adapter"
            shutil.copytree(adapter_dir, staged, symlinks=True)
            template = self._template_for(staged, template_id, ref)
            contract = self.get_base(template.base_model_id, template.base_revision)
            violations = check_adapter(staged, contract, template, self.limits)
            if violations:
                raise IncompatibleAdapterError(ref, violations)
            files = {p.name: sha256_file(p) for p in sorted(staged.iterdir())}
            for rel, digest in files.items():
                self.store.put(staged / rel, digest)
            size = sum((staged / rel).stat().st_size for rel in files)
            manifest = AdapterManifest.read(staged)
        try:
            return self._insert_version(tenant, name, template, files, size, manifest, aliases)
        except IntegrityError:
            raise ConflictError(f"{ref}: a concurrent registration won; push again") from None

    def _template_for(self, staged: Path, template_id: str | None, ref: str) -> AdapterTemplate:
        if template_id is None:
            try:
                template_id = AdapterManifest.read(staged).template_id
            except ManifestError as exc:
                raise IncompatibleAdapterError(ref, [Violation("manifest_invalid", str(exc))]) from None
        return self.get_template(template_id)

    def _insert_version(self, tenant: Tenant, name: str, template: AdapterTemplate,
                        files: dict[str, str], size: int, manifest: AdapterManifest,
                        aliases: list[str]) -> AdapterVersion:
        content = sha256_tree(files)
        with Session(self.engine) as s, s.begin():
            adapter = s.scalar(select(AdapterRow).filter_by(tenant_id=tenant.id, name=name))
            if adapter is None:
                adapter = AdapterRow(tenant_id=tenant.id, name=name, template_id=template.template_id)
                s.add(adapter)
                s.flush()
            elif adapter.template_id != template.template_id:
                raise ConflictError(
                    f"{tenant.name}/{name} uses template {adapter.template_id}; this adapter "
                    f"was built from {template.template_id}"
                )
            same = s.scalar(select(AdapterVersionRow.version).filter_by(
                adapter_id=adapter.id, content_sha256=content))
            if same is not None:
                raise ConflictError(f"{tenant.name}/{name}: identical content is already v{same}")
            latest = s.scalar(select(func.max(AdapterVersionRow.version)).filter_by(adapter_id=adapter.id))
            row = AdapterVersionRow(adapter_id=adapter.id, version=(latest or 0) + 1,
                                    content_sha256=content, files=files,
                                    manifest=_manifest_dict(manifest), size_bytes=size)
            s.add(row)
            s.flush()
            has_default = s.get(AliasRow, (adapter.id, adapter.default_alias)) is not None
            targets = set(aliases) | (set() if has_default else {adapter.default_alias})
            for alias in targets:
                s.merge(AliasRow(adapter_id=adapter.id, name=alias, version_id=row.id))
            version = _to_version(row, tenant.name, name, template)
            record(s, self.actor, "version.register", version.ref, lora_int_id=row.id,
                   content_sha256=content, aliases=sorted(targets))
        logger.info("registered %s (lora_int_id=%d, aliases=%s)", version.ref,
                    version.lora_int_id, sorted(targets))
        return version

    def set_alias(self, tenant_name: str, name: str, alias: str, version: int) -> None:
        """Point ``alias`` at an active version, atomically (rollback = point it back)."""
        validate_name("alias", alias)
        tenant = self.get_tenant(tenant_name)
        with Session(self.engine) as s, s.begin():
            adapter, row = self._version_row(s, tenant, name, version)
            if row.state != "active":
                raise ConflictError(f"{tenant.name}/{name}@v{version} is {row.state}; "
                                    "aliases may only point at active versions")
            old = s.get(AliasRow, (adapter.id, alias))
            previous = s.get(AdapterVersionRow, old.version_id).version if old else None  # type: ignore[union-attr]
            s.merge(AliasRow(adapter_id=adapter.id, name=alias, version_id=row.id))
            record(s, self.actor, "alias.set", f"{tenant.name}/{name}:{alias}",
                   previous=previous, version=version)

    def deprecate_version(self, tenant_name: str, name: str, version: int) -> None:
        """Still servable by ``@vN``, but no alias may point at it any more."""
        self._set_state(tenant_name, name, version, "deprecated", "version.deprecate")

    def delete_version(self, tenant_name: str, name: str, version: int) -> None:
        """Never served again; its row stays so its lora_int_id is never reused."""
        self._set_state(tenant_name, name, version, "deleted", "version.delete")

    def _set_state(self, tenant_name: str, name: str, version: int, state: str,
                   action: str) -> None:
        tenant = self.get_tenant(tenant_name)
        with Session(self.engine) as s, s.begin():
            adapter, row = self._version_row(s, tenant, name, version)
            pointing = sorted(a.name for a in s.scalars(select(AliasRow).filter_by(
                adapter_id=adapter.id, version_id=row.id)))
            if pointing:
                raise ConflictError(f"{tenant.name}/{name}@v{version} is the target of alias(es) "
                                    f"{pointing}; move them first")
            row.state = state
            record(s, self.actor, action, f"{tenant.name}/{name}@v{version}")

    def collect_garbage(self, *, grace: timedelta = timedelta(hours=1),
                        dry_run: bool = False) -> GcReport:
        """Delete blobs no live version references and older than ``grace``.

        Blobs are uploaded before their version's row commits, so a young unreferenced
        blob may belong to a push in flight: the grace period keeps it.
        """
        with Session(self.engine) as s:
            referenced = {digest for files in s.scalars(select(AdapterVersionRow.files).where(
                AdapterVersionRow.state != "deleted")) for digest in files.values()}
        cutoff = datetime.now(UTC) - grace
        orphans, young = [], 0
        for digest, modified in self.store.list_blobs():
            if digest in referenced:
                continue
            if modified > cutoff:
                young += 1
            else:
                orphans.append(digest)
        if not dry_run:
            for digest in orphans:
                self.store.delete(digest)
            with Session(self.engine) as s, s.begin():
                record(s, self.actor, "gc.run", self.store.describe(), deleted=len(orphans),
                       kept_young=young)
        return GcReport(sorted(orphans), young, len(referenced), dry_run)

    def audit_log(self, *, subject_prefix: str | None = None, limit: int = 100) -> list[AuditEntry]:
        return read_audit(self.engine, subject_prefix=subject_prefix, limit=limit)

    def _version_row(self, s: Session, tenant: Tenant, name: str,
                     version: int) -> tuple[AdapterRow, AdapterVersionRow]:
        adapter = self._adapter_row(s, tenant, name)
        row = s.scalar(select(AdapterVersionRow).filter_by(adapter_id=adapter.id, version=version))
        if row is None or row.state == "deleted":
            raise NotFoundError(f"{tenant.name}/{name}@v{version} does not exist")
        return adapter, row

    def resolve(self, tenant: Tenant, model: str) -> AdapterVersion:
        """The version a tenant's ``model`` names; NotFoundError for anything else."""
        ref = ModelRef.parse(model)
        with Session(self.engine) as s:
            adapter = self._adapter_row(s, tenant, ref.name, shown=model)
            if ref.version is not None:
                row = s.scalar(select(AdapterVersionRow).filter_by(
                    adapter_id=adapter.id, version=ref.version))
            else:
                alias = s.get(AliasRow, (adapter.id, ref.alias or adapter.default_alias))
                row = s.get(AdapterVersionRow, alias.version_id) if alias else None
            if row is None or row.state == "deleted":
                raise NotFoundError(f"model {model!r} does not exist")
            template = AdapterTemplate.from_dict(s.get(TemplateRow, adapter.template_id).fields)  # type: ignore[union-attr]
            return _to_version(row, tenant.name, adapter.name, template)

    def list_adapters(self, tenant: Tenant) -> list[AdapterInfo]:
        with Session(self.engine) as s:
            out = []
            for a in s.scalars(select(AdapterRow).filter_by(tenant_id=tenant.id).order_by(AdapterRow.name)):
                versions = dict(s.execute(select(AdapterVersionRow.id, AdapterVersionRow.version)
                                          .filter_by(adapter_id=a.id)
                                          .where(AdapterVersionRow.state != "deleted")).tuples().all())
                aliases = {al.name: versions[al.version_id]
                           for al in s.scalars(select(AliasRow).filter_by(adapter_id=a.id))}
                out.append(AdapterInfo(tenant.name, a.name, a.template_id, a.default_alias,
                                       aliases, sorted(versions.values()), as_utc(a.created_at)))
            return out

    def fetch(self, version: AdapterVersion, dest: Path) -> None:
        """Write the version's files into ``dest``, each verified against its sha256."""
        for rel, digest in version.files.items():
            self.store.get(digest, Path(dest) / rel)

    def _adapter_row(self, s: Session, tenant: Tenant, name: str, shown: str | None = None) -> AdapterRow:
        row = s.scalar(select(AdapterRow).filter_by(tenant_id=tenant.id, name=name))
        if row is None:
            raise NotFoundError(f"model {shown or name!r} does not exist")
        return row


def _manifest_dict(manifest: AdapterManifest) -> dict[str, object]:
    return asdict(manifest)


def _to_version(row: AdapterVersionRow, tenant: str, name: str,
                template: AdapterTemplate) -> AdapterVersion:
    return AdapterVersion(
        lora_int_id=row.id, tenant=tenant, adapter=name, version=row.version,
        content_sha256=row.content_sha256, files=dict(row.files),
        base_model_id=template.base_model_id, base_revision=template.base_revision,
        template_id=template.template_id, size_bytes=row.size_bytes,
        created_at=as_utc(row.created_at),
    )
