"""The catalog: bases, templates, adapters, their immutable versions and their aliases,
and what a tenant's ``model`` resolves to."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from adapters_registry._audit import record
from adapters_registry.changes import Change, publish
from adapters_registry.changes import generation as read_generation
from adapters_registry.contract import BaseContract
from adapters_registry.db import (
    AdapterRow,
    AdapterVersionRow,
    AliasRow,
    AliasSplitRow,
    BaseModelRow,
    TemplateRow,
    as_utc,
)
from adapters_registry.errors import ConflictError, NotFoundError, ValidationError
from adapters_registry.hashing import sha256_tree
from adapters_registry.names import ModelRef, shown, validate_name
from adapters_registry.records import (
    AdapterInfo,
    AdapterVersion,
    Resolution,
    SplitEntry,
    Tenant,
)
from adapters_registry.splits import shadow_of, split_labels, split_problems
from adapters_registry.template import AdapterTemplate
from adapters_registry.tenancy import Tenancy

logger = logging.getLogger(__name__)


class Catalog:
    """What is registered and what names point at; ``actor`` signs the audit trail."""

    def __init__(self, db: Engine, tenancy: Tenancy, *, actor: str) -> None:
        self.db = db
        self.actor = actor
        self._tenancy = tenancy

    def register_base(self, contract: BaseContract) -> BaseContract:
        """Idempotent for an identical contract (new aliases are added); a different one
        under the same revision is refused."""
        validate_name("base", contract.model_id)
        for alias in contract.aliases:
            validate_name("base", alias)
        with Session(self.db) as s, s.begin():
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
                added = sorted(set(contract.aliases) - set(existing.aliases))
                if not added:
                    return existing
                existing = BaseContract.from_dict(existing.to_dict() | {
                    "aliases": sorted(set(existing.aliases) | set(added))})
                row.contract = existing.to_dict()
                record(s, self.actor, "base.alias", f"{contract.model_id}@{contract.revision[:12]}",
                       added=added)
                return existing
            s.add(BaseModelRow(model_id=contract.model_id, revision=contract.revision,
                               contract=contract.to_dict()))
            record(s, self.actor, "base.register", f"{contract.model_id}@{contract.revision[:12]}")
        logger.info("registered base %s@%s", contract.model_id, contract.revision[:12])
        return contract

    def get_base(self, model_id: str, revision: str | None = None) -> BaseContract:
        with Session(self.db) as s:
            q = select(BaseModelRow).filter_by(model_id=model_id)
            if revision is not None:
                q = q.filter_by(revision=revision)
            row = s.scalar(q.order_by(BaseModelRow.id.desc()).limit(1))
            if row is None:
                at = f"@{revision[:12]}" if revision else ""
                raise NotFoundError(f"base {model_id}{at} is not registered")
            return BaseContract.from_dict(row.contract)

    def register_template(self, template: AdapterTemplate) -> AdapterTemplate:
        with Session(self.db) as s, s.begin():
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
        with Session(self.db) as s:
            row = s.get(TemplateRow, template_id)
            if row is None:
                raise NotFoundError(f"template {template_id} is not registered")
            return AdapterTemplate.from_dict(row.fields)

    def templates(self, base: str | None = None) -> list[tuple[BaseContract, AdapterTemplate]]:
        """Every registered template (of ``base``, when named), with its base's contract."""
        with Session(self.db) as s:
            q = select(BaseModelRow.contract, TemplateRow.fields).join(
                BaseModelRow, TemplateRow.base_id == BaseModelRow.id)
            if base is not None:
                q = q.where(BaseModelRow.model_id == base)
            return [(BaseContract.from_dict(c), AdapterTemplate.from_dict(f)) for c, f in s.execute(q)]

    def only_template(self, base: str) -> str:
        with Session(self.db) as s:
            ids = sorted(s.scalars(select(TemplateRow.template_id).join(
                BaseModelRow, TemplateRow.base_id == BaseModelRow.id).where(
                BaseModelRow.model_id == base)))
        if not ids:
            raise NotFoundError(f"base {shown(base)} has no registered template")
        if len(ids) > 1:
            raise ValidationError(f"base {base!r} has {len(ids)} templates ({', '.join(ids)}): "
                                  "name one with --template")
        return ids[0]

    def frozen_template(self, base: str, template_id: str | None = None) -> str:
        """The template new adapters of ``base`` are trained from: ``template_id`` when it is
        one of the base's, else its first registered (NotFoundError when it has none)."""
        with Session(self.db) as s:
            ids = list(s.scalars(select(TemplateRow.template_id).join(
                BaseModelRow, TemplateRow.base_id == BaseModelRow.id).where(
                BaseModelRow.model_id == base).order_by(TemplateRow.created_at, TemplateRow.template_id)))
        if not ids:
            raise NotFoundError(f"base {shown(base)} has no registered template")
        if template_id is None:
            return ids[0]
        if template_id not in ids:
            raise NotFoundError(f"template {template_id} is not one of base {shown(base)}'s")
        return template_id

    def insert_version(self, tenant: Tenant, name: str, template: AdapterTemplate,
                        files: dict[str, str], size: int, intake: dict[str, Any],
                        aliases: list[str], repaired: list[str]) -> AdapterVersion:
        content = sha256_tree(files)
        with Session(self.db) as s, s.begin():
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
                fixed = f"; its corrupted stored file(s) {repaired} were repaired" if repaired else ""
                raise ConflictError(f"{tenant.name}/{name}: identical content is already v{same}{fixed}")
            latest = s.scalar(select(func.max(AdapterVersionRow.version)).filter_by(adapter_id=adapter.id))
            row = AdapterVersionRow(adapter_id=adapter.id, version=(latest or 0) + 1,
                                    content_sha256=content, files=files,
                                    manifest=intake, size_bytes=size)
            s.add(row)
            s.flush()
            has_default = s.get(AliasRow, (adapter.id, adapter.default_alias)) is not None
            targets = set(aliases) | (set() if has_default else {adapter.default_alias})
            for alias in targets:
                s.merge(AliasRow(adapter_id=adapter.id, name=alias, version_id=row.id))
            version = _to_version(row, tenant.name, name, template)
            record(s, self.actor, "version.register", version.ref, lora_int_id=row.id,
                   content_sha256=content, aliases=sorted(targets))
            publish(s, Change("version", tenant.id, tenant.name, name))
        logger.info("registered %s (lora_int_id=%d, aliases=%s)", version.ref,
                    version.lora_int_id, sorted(targets))
        return version

    def set_alias(self, tenant_name: str, name: str, alias: str, version: int) -> None:
        """Point ``alias`` at an active version, atomically (rollback = point it back); a
        split the alias had ends: every caller gets ``version``."""
        validate_name("alias", alias)
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s, s.begin():
            self.move_alias(s, tenant, name, alias, version)

    def set_split(self, tenant_name: str, name: str, alias: str,
                  weights: Mapping[int | None, int]) -> None:
        """Send ``alias``'s callers to several active versions (key None: the bare base), each
        caller to one, by integer weight (shares are weight / total). The alias's current
        version stays its stable version if it is in the split, else the heaviest version
        becomes it. One version alone is a plain alias move. Every problem is listed."""
        validate_name("alias", alias)
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s, s.begin():
            self.split_alias(s, tenant, name, alias, weights)

    def move_alias(self, s: Session, tenant: Tenant, name: str, alias: str, version: int,
                   **audit: Any) -> None:
        """``set_alias`` inside the caller's transaction (``audit``: more details to record)."""
        adapter, row = self._active_row(s, tenant, name, version)
        old = s.get(AliasRow, (adapter.id, alias))
        previous = s.get_one(AdapterVersionRow, old.version_id).version if old else None
        s.merge(AliasRow(adapter_id=adapter.id, name=alias, version_id=row.id))
        ended = split_labels(s, adapter.id, alias)
        s.execute(delete(AliasSplitRow).filter_by(adapter_id=adapter.id, alias=alias))
        record(s, self.actor, "alias.set", f"{tenant.name}/{name}:{alias}",
               previous=previous, version=version, **({"split_ended": ended} if ended else {}),
               **audit)
        publish(s, Change("alias", tenant.id, tenant.name, name))

    def split_alias(self, s: Session, tenant: Tenant, name: str, alias: str,
                    weights: Mapping[int | None, int], **audit: Any) -> None:
        """``set_split`` inside the caller's transaction (``audit``: more details to record)."""
        problems = split_problems(weights)
        if problems:
            raise ValidationError(f"invalid split for {tenant.name}/{name}:{alias}: "
                                  + "; ".join(problems))
        versions = sorted(v for v in weights if v is not None)
        if len(weights) == 1:
            self.move_alias(s, tenant, name, alias, versions[0], **audit)
            return
        adapter = self._adapter_row(s, tenant, name)
        rows = {v: self._active_row(s, tenant, name, v)[1] for v in versions}
        old = s.get(AliasRow, (adapter.id, alias))
        ids = {row.id for row in rows.values()}
        if old is None or old.version_id not in ids:
            heaviest = max(versions, key=lambda v: (weights[v], -v))
            s.merge(AliasRow(adapter_id=adapter.id, name=alias, version_id=rows[heaviest].id))
        s.execute(delete(AliasSplitRow).filter_by(adapter_id=adapter.id, alias=alias))
        entries = sorted(weights.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        for slot, (v, weight) in enumerate(entries):
            s.add(AliasSplitRow(adapter_id=adapter.id, alias=alias, slot=slot,
                                version_id=None if v is None else rows[v].id, weight=weight))
        s.flush()
        record(s, self.actor, "alias.split", f"{tenant.name}/{name}:{alias}",
               weights=split_labels(s, adapter.id, alias),
               stable=s.get_one(AdapterVersionRow, s.get_one(AliasRow, (adapter.id, alias))
                                .version_id).version, **audit)
        publish(s, Change("alias", tenant.id, tenant.name, name))

    def alias_version(self, s: Session, tenant: Tenant, name: str, alias: str) -> int | None:
        """The version ``alias`` names now (a split's stable one); None if it names none."""
        adapter = self._adapter_row(s, tenant, name)
        row = s.get(AliasRow, (adapter.id, alias))
        return None if row is None else s.get_one(AdapterVersionRow, row.version_id).version

    def _active_row(self, s: Session, tenant: Tenant, name: str,
                    version: int) -> tuple[AdapterRow, AdapterVersionRow]:
        adapter, row = self._version_row(s, tenant, name, version)
        if row.state != "active":
            raise ConflictError(f"{tenant.name}/{name}@v{version} is {row.state}; "
                                "aliases may only point at active versions")
        return adapter, row

    def deprecate_version(self, tenant_name: str, name: str, version: int) -> None:
        """Still servable by ``@vN``, but no alias may point at it any more."""
        self._set_state(tenant_name, name, version, "deprecated", "version.deprecate")

    def delete_version(self, tenant_name: str, name: str, version: int) -> None:
        """Never served again; its row stays so its lora_int_id is never reused."""
        self._set_state(tenant_name, name, version, "deleted", "version.delete")

    def _set_state(self, tenant_name: str, name: str, version: int, state: str,
                   action: str) -> None:
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s, s.begin():
            adapter, row = self._version_row(s, tenant, name, version)
            pointing = sorted({a.name for a in s.scalars(select(AliasRow).filter_by(
                adapter_id=adapter.id, version_id=row.id))} | {a.alias for a in s.scalars(
                    select(AliasSplitRow).filter_by(adapter_id=adapter.id, version_id=row.id))})
            if pointing:
                raise ConflictError(f"{tenant.name}/{name}@v{version} is the target of alias(es) "
                                    f"{pointing}; move them first")
            row.state = state
            record(s, self.actor, action, f"{tenant.name}/{name}@v{version}")
            publish(s, Change("version", tenant.id, tenant.name, name))

    def _version_row(self, s: Session, tenant: Tenant, name: str,
                     version: int) -> tuple[AdapterRow, AdapterVersionRow]:
        adapter = self._adapter_row(s, tenant, name)
        row = s.scalar(select(AdapterVersionRow).filter_by(adapter_id=adapter.id, version=version))
        if row is None or row.state == "deleted":
            raise NotFoundError(f"{tenant.name}/{name}@v{version} does not exist")
        return adapter, row

    def resolve(self, tenant: Tenant, model: str | ModelRef) -> AdapterVersion:
        """The version a tenant's ``model`` names (an alias's stable version); NotFoundError
        for anything else."""
        return self.resolve_split(tenant, model).version

    def resolve_split(self, tenant: Tenant, model: str | ModelRef) -> Resolution:
        """What a tenant's ``model`` names: its version and, for an alias with a weighted
        split, the split (which version each caller gets is the gateway's choice)."""
        ref = model if isinstance(model, ModelRef) else ModelRef.parse(model)
        with Session(self.db) as s:
            adapter = self._adapter_row(s, tenant, ref.name, shown_as=str(model))
            split_rows: list[AliasSplitRow] = []
            name: str | None = None
            if ref.version is not None:
                row = s.scalar(select(AdapterVersionRow).filter_by(
                    adapter_id=adapter.id, version=ref.version))
            else:
                name = ref.alias or adapter.default_alias
                alias = s.get(AliasRow, (adapter.id, name))
                row = s.get(AdapterVersionRow, alias.version_id) if alias else None
                split_rows = list(s.scalars(select(AliasSplitRow).filter_by(
                    adapter_id=adapter.id, alias=name).order_by(AliasSplitRow.slot)))
            if row is None or row.state == "deleted":
                raise NotFoundError(f"model {str(model)!r} does not exist")
            template = AdapterTemplate.from_dict(s.get_one(TemplateRow, adapter.template_id).fields)
            split = tuple(SplitEntry(None if r.version_id is None else _to_version(
                s.get_one(AdapterVersionRow, r.version_id), tenant.name, adapter.name, template),
                r.weight) for r in split_rows)
            version = _to_version(row, tenant.name, adapter.name, template)
            return Resolution(version, split, name,
                              shadow_of(s, adapter.id, name, version, split) if split else None)

    def generation(self) -> int:
        """The number of changes published so far (``changes.generation``): equal readings
        mean no resolution, key or limit changed in between."""
        return read_generation(self.db)

    def list_adapters(self, tenant: Tenant) -> list[AdapterInfo]:
        with Session(self.db) as s:
            out = []
            for a in s.scalars(select(AdapterRow).filter_by(tenant_id=tenant.id).order_by(AdapterRow.name)):
                versions = dict(s.execute(select(AdapterVersionRow.id, AdapterVersionRow.version)
                                          .filter_by(adapter_id=a.id)
                                          .where(AdapterVersionRow.state != "deleted")).tuples().all())
                aliases = {al.name: versions[al.version_id]
                           for al in s.scalars(select(AliasRow).filter_by(adapter_id=a.id))}
                splits = {al: split_labels(s, a.id, al) for al in aliases}
                out.append(AdapterInfo(tenant.name, a.name, a.template_id, a.default_alias,
                                       aliases, sorted(versions.values()), as_utc(a.created_at),
                                       {al: split for al, split in splits.items() if split}))
            return out

    def _adapter_row(self, s: Session, tenant: Tenant, name: str, shown_as: str | None = None) -> AdapterRow:
        row = s.scalar(select(AdapterRow).filter_by(tenant_id=tenant.id, name=name))
        if row is None:
            raise NotFoundError(f"model {shown(shown_as or name)} does not exist")
        return row


def _to_version(row: AdapterVersionRow, tenant: str, name: str,
                template: AdapterTemplate) -> AdapterVersion:
    return AdapterVersion(
        lora_int_id=row.id, tenant=tenant, adapter=name, version=row.version,
        content_sha256=row.content_sha256, files=dict(row.files),
        base_model_id=template.base_model_id, base_revision=template.base_revision,
        template_id=template.template_id, size_bytes=row.size_bytes,
        created_at=as_utc(row.created_at),
    )


__all__ = ["Catalog"]
