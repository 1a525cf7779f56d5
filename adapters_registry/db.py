"""Metadata tables (SQLAlchemy 2.0). SQLite is the embedded default; PostgreSQL works too.

Storage rows only: services hand out the frozen dataclasses in ``records.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from adapters_registry.limits import LIMITS

# SQLite needs AUTOINCREMENT so a deleted version's id is never handed out again:
# that id is vLLM's lora_int_id, and vLLM's cache would serve the old content.
_NEVER_REUSE_IDS = {"sqlite_autoincrement": True}


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class BaseModelRow(Base):
    __tablename__ = "bases"
    __table_args__ = (UniqueConstraint("model_id", "revision"), _NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(200))
    revision: Mapped[str] = mapped_column(String(64))
    contract: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TemplateRow(Base):
    __tablename__ = "templates"

    template_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("bases.id"))
    fields: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TenantRow(Base):
    __tablename__ = "tenants"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TenantLimitsRow(Base):
    """A tenant's quotas and fair-share weight; a null field means the gateway's default."""

    __tablename__ = "tenant_limits"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


# One nullable column per limit, named after it (adapters_registry.limits).
for _spec in LIMITS:
    setattr(TenantLimitsRow, _spec.name, mapped_column(Integer if _spec.kind is int else Float,
                                                       nullable=True))


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"), _NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(64))
    template_id: Mapped[str] = mapped_column(ForeignKey("templates.template_id"))
    default_alias: Mapped[str] = mapped_column(String(64), default="prod")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AdapterVersionRow(Base):
    """One immutable version; its primary key is the vLLM lora_int_id."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version"), _NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    version: Mapped[int] = mapped_column(Integer)
    content_sha256: Mapped[str] = mapped_column(String(64))
    files: Mapped[dict[str, Any]]
    manifest: Mapped[dict[str, Any]]  # its intake record (artifacts._intake_record)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    state: Mapped[str] = mapped_column(String(16), default="active", server_default="active")

    @property
    def trainer_metrics(self) -> dict[str, Any]:
        """The metrics of the trainer's manifest it shipped with (empty without one)."""
        return dict(((self.manifest or {}).get("manifest") or {}).get("metrics") or {})


class AliasRow(Base):
    __tablename__ = "aliases"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AliasSplitRow(Base):
    """An alias's weighted split (progressive delivery, A/B): each caller of the alias is
    sent to one entry, by weight (``catalog.Catalog.set_split``). ``version_id`` None: the
    bare base. No rows: the alias names its one version (``AliasRow``), which stays the
    split's stable version, where a plain alias move (the rollback) returns everyone."""

    __tablename__ = "alias_splits"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"), nullable=True)
    weight: Mapped[int] = mapped_column(Integer)


class RolloutRow(Base):
    """A candidate version's progressive rollout under an alias (``rollouts.Rollouts``).

    ``active`` is True while it runs or is paused, else NULL: the unique constraint then
    allows one active rollout per alias (NULLs never collide) and keeps every finished one."""

    __tablename__ = "rollouts"
    __table_args__ = (UniqueConstraint("adapter_id", "alias", "active"), _NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    alias: Mapped[str] = mapped_column(String(64))
    stable_version: Mapped[int] = mapped_column(Integer)
    candidate_version: Mapped[int] = mapped_column(Integer)
    steps: Mapped[dict[str, Any]] = mapped_column()  # {"percents": [5, 25, 50, 100]}
    rules: Mapped[dict[str, Any]] = mapped_column()
    step: Mapped[int] = mapped_column(Integer)  # index into the percents
    state: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool | None] = mapped_column(nullable=True)
    reason: Mapped[str] = mapped_column(String(2000), default="")
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the last decision's figures
    step_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class LeaseRow(Base):
    """A lease one process holds until ``until``: who makes rollout decisions now."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    until: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FileRow(Base):
    """A tenant's uploaded fine-tuning file (``files.Files``): its bytes are one blob."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # file-...
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column("bytes", BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(16))  # supervised or dpo
    examples: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class JobRow(Base):
    """A fine-tuning job (``jobs.Jobs``): the queue row a worker claims under a lease."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (Index("ix_jobs_status", "status", "created_at"),
                      Index("ix_jobs_tenant", "tenant_id", "created_at"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # ftjob-...
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    model: Mapped[str] = mapped_column(String(300))  # as the tenant named it
    template_id: Mapped[str] = mapped_column(ForeignKey("templates.template_id"))
    init_version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"), nullable=True)
    method: Mapped[str] = mapped_column(String(16))  # supervised or dpo
    hyperparameters: Mapped[dict[str, Any]] = mapped_column()
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    extra: Mapped[dict[str, Any]] = mapped_column()  # metadata, the limits that apply
    status: Mapped[str] = mapped_column(String(24))
    error: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class JobEventRow(Base):
    __tablename__ = "fine_tuning_job_events"
    __table_args__ = (Index("ix_job_events_job", "job_id", "id"), _NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))  # message or metrics
    message: Mapped[str] = mapped_column(String(4000))
    data: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)


class JobCheckpointRow(Base):
    """One epoch's adapter weights, kept in the artifact store (blobs by sha256)."""

    __tablename__ = "fine_tuning_checkpoints"
    __table_args__ = (Index("ix_job_checkpoints_job", "job_id", "step"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # ftckpt-...
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column()
    files: Mapped[dict[str, Any]] = mapped_column()  # name -> sha256
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AuditRow(Base):
    """Who changed what, when: written in the same transaction as the change."""

    __tablename__ = "audit_log"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(300))
    details: Mapped[dict[str, Any]]


class GenerationRow(Base):
    """One row: a counter every change notice bumps, in the change's own transaction.

    A reader that sees the same number twice knows nothing a cache holds changed in between
    (a row update commits in order, unlike a sequence), so one read confirms every cached
    resolution, key and limit at once."""

    __tablename__ = "registry_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageRow(Base):
    """What one writer (one gateway process) served for one tenant and model in one minute.

    The writer replaces its own totals on every flush (never adds to them), so a flush that
    is retried, or that committed before its caller saw an error, counts nothing twice; a
    restarted process is another writer. Tenant and model are names, not ids: a bill
    outlives the tenant's deletion."""

    __tablename__ = "usage_minutes"
    __table_args__ = (Index("ix_usage_minutes_minute", "minute"),)

    writer: Mapped[str] = mapped_column(String(100), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(300), primary_key=True)  # version ref, or the base
    minute: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    requests_2xx: Mapped[int] = mapped_column(BigInteger, default=0)
    requests_4xx: Mapped[int] = mapped_column(BigInteger, default=0)
    requests_5xx: Mapped[int] = mapped_column(BigInteger, default=0)
    aborted: Mapped[int] = mapped_column(BigInteger, default=0)  # the client left mid-answer
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class AnswerStatsRow(Base):
    """What one writer's answers for one tenant and model in one minute looked like (times
    to first token, latencies, refusals, shadow comparisons: ``answer_stats``), beside the
    bill in ``usage_minutes``; replaced whole by its writer on every flush, as usage is."""

    __tablename__ = "answer_stats_minutes"
    __table_args__ = (Index("ix_answer_stats_minutes_minute", "minute"),)

    writer: Mapped[str] = mapped_column(String(100), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(300), primary_key=True)
    minute: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every value the registry gives out is UTC-aware."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def as_utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else as_utc(moment)
