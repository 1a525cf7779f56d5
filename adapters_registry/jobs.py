"""Fine-tuning jobs (OpenAI's ``/v1/fine_tuning/jobs``): the tenant's side. The workers'
side, the queue, is ``job_queue``.

A job is a row of this database, and the row is the queue. Its states are OpenAI's:

    validating_files -> queued -> running -> succeeded
            |             |          |-----> failed      (data, gates, a worker lost twice)
            +-------------+----------+-----> cancelled

Workers (``lora-gateway worker``, in the trainer) take jobs from ``job_queue.JobQueue``:
validations first, then queued jobs within each tenant's ``max_running_jobs``; a lost
worker's run resumes once from its last checkpoint, then fails ``worker_lost``. A job
cancelled here stops its worker within a heartbeat; one publishing no longer can be.
"""

from __future__ import annotations

import builtins
import logging
import random
import secrets
from collections.abc import Collection, Mapping
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from adapters_registry._audit import record
from adapters_registry.catalog import Catalog
from adapters_registry.db import (
    AdapterRow,
    AdapterVersionRow,
    JobCheckpointRow,
    JobEventRow,
    JobRow,
    TenantRow,
    as_utc,
)
from adapters_registry.errors import ConflictError, LimitReachedError, NotFoundError, ValidationError
from adapters_registry.files import Files
from adapters_registry.job_records import (
    ACTIVE,
    FINISHED,
    FORMAT_NAMES,
    METHODS,
    QUEUE_RETRY_AFTER_S,
    WAITING,
    Checkpoint,
    Job,
    JobEvent,
    JobLimits,
    JobRequest,
    add_event,
    checkpoint_record,
    described,
    job_record,
    request_problems,
)
from adapters_registry.tenancy import Tenancy

logger = logging.getLogger(__name__)

class Jobs:
    def __init__(self, db: Engine, catalog: Catalog, tenancy: Tenancy, files: Files, *,
                 actor: str) -> None:
        self.db = db
        self._catalog = catalog
        self._tenancy = tenancy
        self._files = files
        self.actor = actor

    # -- the tenant's side ---------------------------------------------------------------

    def create(self, tenant_name: str, request: JobRequest, *, base_model_id: str,
               base_names: Collection[str], limits: JobLimits, template_id: str | None = None) -> Job:
        """Check everything a job needs before it is queued; every problem at once. A job from
        the base trains ``template_id``, by default the base's frozen template: its first
        registered (every tenant's adapter of one shape, so they share the engine's batches)."""
        tenant = self._tenancy.get_tenant(tenant_name)
        problems = request_problems(request)
        files = {}
        for param, file_id in (("training_file", request.training_file),
                               ("validation_file", request.validation_file),
                               *((f"gates.{k}", v) for k, v in request.eval_files.items())):
            if file_id is None:
                continue
            try:
                files[param] = self._files.get(tenant.name, file_id)
            except NotFoundError:
                problems.append(f"{param}: no such file {file_id!r}")
                continue
            # eval sets are chat examples whatever the method: prompts and (golden) answers
            wanted = "dpo" if request.method == "dpo" and not param.startswith("gates.") else "supervised"
            if request.method in METHODS and files[param].format != wanted:
                problems.append(f"{param} {file_id} holds {described(files[param])}, but method "
                                f"{request.method!r} trains on {FORMAT_NAMES[wanted]}")
        init: AdapterVersionRow | None = None
        init_ref: str | None = None
        if request.model in base_names:
            template_id = self._catalog.frozen_template(base_model_id, template_id)
        else:
            version = self._catalog.resolve(tenant, request.model)  # NotFoundError: 404
            if version.base_model_id != base_model_id:
                raise NotFoundError(f"model {request.model} does not exist")
            template_id, init_ref = version.template_id, version.ref
            with Session(self.db) as s:
                init = s.get(AdapterVersionRow, version.lora_int_id)
        job_id = f"ftjob-{secrets.token_hex(12)}"
        adapter_name = request.suffix or f"ft-{job_id[6:18]}"
        with Session(self.db) as s, s.begin():
            existing = s.scalar(select(AdapterRow).filter_by(tenant_id=tenant.id, name=adapter_name))
            if existing is not None and existing.template_id != template_id:
                problems.append(f"suffix {adapter_name!r} names an adapter of template "
                                f"{existing.template_id}; this job trains template {template_id}: "
                                "choose another suffix")
            if problems:
                raise ValidationError("invalid fine-tuning job: " + "; ".join(problems))
            s.scalar(select(TenantRow).filter_by(id=tenant.id).with_for_update())
            waiting = s.scalar(select(func.count()).select_from(JobRow).where(
                JobRow.tenant_id == tenant.id, JobRow.status.in_(WAITING))) or 0
            if limits.max_queued_jobs is not None and waiting >= limits.max_queued_jobs:
                raise LimitReachedError(
                    f"tenant {tenant.name} has {waiting} fine-tuning job(s) waiting, its limit "
                    f"(max_queued_jobs {limits.max_queued_jobs}); retry when one has started",
                    QUEUE_RETRY_AFTER_S)
            now = datetime.now(UTC)
            row = JobRow(
                id=job_id, tenant_id=tenant.id, model=request.model, template_id=template_id,
                init_version_id=None if init is None else init.id, method=request.method,
                hyperparameters={k: v for k, v in request.hyperparameters.items() if v != "auto"},
                training_file=request.training_file, validation_file=request.validation_file,
                suffix=request.suffix,
                seed=request.seed if request.seed is not None else random.randrange(2**31),
                extra={"metadata": dict(request.metadata) if request.metadata else None,
                       "gates": dict(request.gates), "eval_files": dict(request.eval_files),
                       "adapter": adapter_name, "init": init_ref,
                       "limits": {"max_running_jobs": limits.max_running_jobs,
                                  "max_training_tokens": limits.max_training_tokens}},
                status="validating_files", cancel_requested=False, created_at=now)
            s.add(row)
            s.flush()
            add_event(s, job_id, f"Validating training file: {request.training_file}"
                   + (f" and validation file: {request.validation_file}" if request.validation_file
                      else ""))
            record(s, self.actor, "job.create", f"{tenant.name}/{job_id}", model=request.model,
                   method=request.method, training_file=request.training_file)
            return job_record(row, tenant.name)

    def list(self, tenant_name: str, *, after: str | None = None, limit: int = 20,
             metadata: Mapping[str, str] | None = None) -> tuple[builtins.list[Job], bool]:
        """The tenant's jobs, newest first, after the job ``after``; and whether more follow."""
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s:
            query = select(JobRow).filter_by(tenant_id=tenant.id)
            if after is not None:
                cursor = self._row(s, tenant.id, after)
                query = query.where((JobRow.created_at < cursor.created_at)
                                    | ((JobRow.created_at == cursor.created_at) & (JobRow.id < cursor.id)))
            for key, value in (metadata or {}).items():  # in the database: one page read, never all
                query = query.where(JobRow.extra[("metadata", key)].as_string() == value)
            rows = s.scalars(query.order_by(JobRow.created_at.desc(), JobRow.id.desc())
                             .limit(limit + 1)).all()
            jobs = [job_record(r, tenant.name) for r in rows]
        return jobs[:limit], len(jobs) > limit

    def get(self, tenant_name: str, job_id: str) -> Job:
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s:
            return job_record(self._row(s, tenant.id, job_id), tenant.name)

    def cancel(self, tenant_name: str, job_id: str) -> Job:
        """Cancelled at once; a running job's worker stops within a heartbeat, publishing nothing."""
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s, s.begin():
            row = self._row(s, tenant.id, job_id, lock=True)
            if row.status in FINISHED:
                raise ConflictError(f"job {job_id} has already {row.status}; nothing to cancel")
            if row.extra.get("publishing"):
                raise ConflictError(f"job {job_id} passed its gates and is publishing its adapter; "
                                    "it can no longer be cancelled")
            was = row.status
            row.status, row.cancel_requested, row.finished_at = "cancelled", True, datetime.now(UTC)
            add_event(s, job_id, "Job cancelled" + (" (the worker stops at its next step)"
                                                  if was == "running" else ""))
            record(s, self.actor, "job.cancel", f"{tenant.name}/{job_id}", was=was)
            return job_record(row, tenant.name)

    def events(self, tenant_name: str, job_id: str, *, after: str | None = None,
               limit: int = 20) -> tuple[builtins.list[JobEvent], bool]:
        """Newest first, as OpenAI lists them; ``after`` an event id (``ftevent-N``)."""
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s:
            self._row(s, tenant.id, job_id)
            query = select(JobEventRow).filter_by(job_id=job_id)
            if after is not None:
                number = after.removeprefix("ftevent-")
                if not number.isdigit():
                    raise ValidationError(f"after: {after!r} is not an event id (ftevent-N)")
                query = query.where(JobEventRow.id < int(number))
            rows = s.scalars(query.order_by(JobEventRow.id.desc()).limit(limit + 1)).all()
            events = [JobEvent(r.id, as_utc(r.created_at), r.level, r.type, r.message, r.data)
                      for r in rows]
        return events[:limit], len(events) > limit

    def checkpoints(self, tenant_name: str, job_id: str, *, after: str | None = None,
                    limit: int = 10) -> tuple[builtins.list[Checkpoint], bool]:
        tenant = self._tenancy.get_tenant(tenant_name)
        with Session(self.db) as s:
            self._row(s, tenant.id, job_id)
            rows = s.scalars(select(JobCheckpointRow).filter_by(job_id=job_id)
                             .order_by(JobCheckpointRow.step.desc())).all()
        out = [checkpoint_record(r) for r in rows]
        if after is not None:
            ids = [c.id for c in out]
            out = out[ids.index(after) + 1:] if after in ids else []
        return out[:limit], len(out) > limit

    def referenced_blobs(self) -> set[str]:
        """The blobs of every checkpoint (garbage collection keeps them)."""
        with Session(self.db) as s:
            return {d for files in s.scalars(select(JobCheckpointRow.files)) for d in files.values()}

    # -- rows ------------------------------------------------------------------------------

    @staticmethod
    def _row(s: Session, tenant_id: int, job_id: str, *, lock: bool = False) -> JobRow:
        row = s.get(JobRow, job_id, with_for_update=lock) if len(job_id) <= 40 else None
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"No such fine-tuning job: {job_id}")
        return row


__all__ = ["ACTIVE", "FINISHED", "METHODS", "Checkpoint", "Job", "JobEvent", "JobLimits",
           "JobRequest", "Jobs"]
