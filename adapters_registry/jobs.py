"""Fine-tuning jobs (OpenAI's ``/v1/fine_tuning/jobs``): the tenant's side and the workers'.

A job is a row of this database, and the row is the queue. Its states are OpenAI's:

    validating_files -> queued -> running -> succeeded
            |             |          |-----> failed      (data, gates, a worker lost twice)
            +-------------+----------+-----> cancelled

Workers (``lora-gateway worker``, in the trainer) ``claim`` a job: first any job still
validating its files (quick, and it tells the tenant early what is wrong with the data),
else the oldest queued job whose tenant runs fewer than ``max_running_jobs``. On PostgreSQL
the claim takes rows ``FOR UPDATE SKIP LOCKED``, so workers never wait on each other's
rows, and locks the tenant's row while it counts that tenant's running jobs, so two
workers cannot both take a tenant's last slot; SQLite (the embedded default) runs one
worker. A claimed job carries a lease its worker renews (``heartbeat``); a worker that
stops renewing loses it: a validation is handed to the next worker, a training run is
queued again and resumes from its last checkpoint, once; lost a second time it fails with
``worker_lost`` (its events and checkpoints kept, nothing published).

Publication is one step the tenant can no longer cancel (``begin_publish``), then the
registry's own push: a version appears whole or not at all, and it moves no alias.
"""

from __future__ import annotations

import builtins
import logging
import random
import secrets
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

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
    checkpoint_record,
    described,
    job_record,
    request_problems,
)
from adapters_registry.tenancy import Tenancy

logger = logging.getLogger(__name__)
MAX_ATTEMPTS = 2  # a run whose worker is lost resumes once from its checkpoint, then fails

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
            _event(s, job_id, f"Validating training file: {request.training_file}"
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
            rows = s.scalars(query.order_by(JobRow.created_at.desc(), JobRow.id.desc())).all()
            jobs = [job_record(r, tenant.name) for r in rows]
        if metadata:
            jobs = [j for j in jobs
                    if j.metadata and all(j.metadata.get(k) == v for k, v in metadata.items())]
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
            _event(s, job_id, "Job cancelled" + (" (the worker stops at its next step)"
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

    # -- the workers' side ---------------------------------------------------------------

    def claim(self, worker: str, *, template_ids: Collection[str], lease_s: float) -> Job | None:
        """The next job this worker should take (validations first), leased to it; or None."""
        now = datetime.now(UTC)
        self.reap(now)
        until = now + timedelta(seconds=lease_s)
        with Session(self.db) as s, s.begin():
            row = s.scalar(select(JobRow).where(
                JobRow.status == "validating_files", JobRow.worker.is_(None),
                JobRow.template_id.in_(template_ids)).order_by(JobRow.created_at)
                .limit(1).with_for_update(skip_locked=True))
            if row is not None:
                row.worker, row.lease_until = worker, until
                return job_record(row, self._tenant_name(s, row))
            candidates = s.scalars(select(JobRow).where(
                JobRow.status == "queued", JobRow.template_id.in_(template_ids))
                .order_by(JobRow.created_at).limit(32).with_for_update(skip_locked=True)).all()
            full: set[int] = set()
            for row in candidates:
                if row.tenant_id in full:
                    continue
                # One tenant's claims in turn: the count below cannot go stale before commit.
                s.scalar(select(TenantRow).filter_by(id=row.tenant_id).with_for_update())
                running = s.scalar(select(func.count()).select_from(JobRow).where(
                    JobRow.tenant_id == row.tenant_id, JobRow.status == "running")) or 0
                cap = row.extra["limits"].get("max_running_jobs")
                if cap is not None and running >= cap:
                    full.add(row.tenant_id)
                    continue
                attempt = row.extra.get("attempts", 0) + 1
                row.status, row.worker, row.lease_until = "running", worker, until
                row.extra = {**row.extra, "attempts": attempt}
                _event(s, row.id, "Fine-tuning job started"
                       + (f" (attempt {attempt}, resuming)" if attempt > 1 else ""))
                return job_record(row, self._tenant_name(s, row))
        return None

    def heartbeat(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Renew this worker's lease; False when the job is no longer its to run (cancelled,
        failed, or its lease was lost)."""
        with Session(self.db) as s, s.begin():
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None or row.worker != worker or row.status not in ACTIVE:
                return False
            row.lease_until = datetime.now(UTC) + timedelta(seconds=lease_s)
            return True

    def event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
        with Session(self.db) as s, s.begin():
            _event(s, job_id, message, level=level, type=type, data=data)

    def validated(self, job_id: str, worker: str, trained_tokens: int) -> bool:
        """The files are good: the job waits for a worker to train it (False: not ours now)."""
        with Session(self.db) as s, s.begin():
            row = self._owned(s, job_id, worker, "validating_files")
            if row is None:
                return False
            row.status, row.worker, row.lease_until = "queued", None, None
            row.trained_tokens = trained_tokens
            _event(s, job_id, f"Files validated: {trained_tokens} training tokens; job queued",
                   data={"trained_tokens": trained_tokens})
            return True

    def add_checkpoint(self, job_id: str, step: int, epoch: int, metrics: dict[str, Any],
                       files: dict[str, str]) -> Checkpoint:
        with Session(self.db) as s, s.begin():
            row = JobCheckpointRow(id=f"ftckpt-{secrets.token_hex(12)}", job_id=job_id, step=step,
                                   epoch=epoch, metrics=metrics, files=files,
                                   created_at=datetime.now(UTC))
            s.add(row)
            s.flush()
            return checkpoint_record(row)

    def latest_checkpoint(self, job_id: str) -> Checkpoint | None:
        with Session(self.db) as s:
            row = s.scalar(select(JobCheckpointRow).filter_by(job_id=job_id)
                           .order_by(JobCheckpointRow.step.desc()).limit(1))
            return None if row is None else checkpoint_record(row)

    def begin_publish(self, job_id: str, worker: str) -> bool:
        """From here the job publishes and cannot be cancelled; False if it was cancelled."""
        with Session(self.db) as s, s.begin():
            row = self._owned(s, job_id, worker, "running")
            if row is None:
                return False
            row.extra = {**row.extra, "publishing": True}
            return True

    def succeed(self, job_id: str, worker: str, fine_tuned_model: str) -> None:
        with Session(self.db) as s, s.begin():
            row = self._owned(s, job_id, worker, "running")
            if row is None:
                raise ConflictError(f"job {job_id} is no longer run by {worker}")
            row.status, row.fine_tuned_model = "succeeded", fine_tuned_model
            row.finished_at, row.lease_until = datetime.now(UTC), None
            _event(s, job_id, f"New fine-tuned model created: {fine_tuned_model}")
            _event(s, job_id, "The job has successfully completed")
            record(s, self.actor, "job.succeed", f"{self._tenant_name(s, row)}/{job_id}",
                   fine_tuned_model=fine_tuned_model)

    def fail(self, job_id: str, worker: str, code: str, message: str,
             param: str | None = None) -> bool:
        """The job failed (False when it was not this worker's any more, e.g. cancelled)."""
        with Session(self.db) as s, s.begin():
            row = self._owned(s, job_id, worker, None)
            if row is None:
                return False
            self._fail(s, row, code, message, param)
            return True

    def release(self, job_id: str, worker: str, why: str) -> bool:
        """A worker that is shutting down hands its run back: queued again, to resume from its
        last checkpoint on the next worker (this attempt is not counted against the job)."""
        with Session(self.db) as s, s.begin():
            row = self._owned(s, job_id, worker, "running")
            if row is None or row.extra.get("publishing"):
                return False
            row.status, row.worker, row.lease_until = "queued", None, None
            row.extra = {**row.extra, "attempts": max(row.extra.get("attempts", 1) - 1, 0)}
            _event(s, job_id, f"worker {worker} {why}; queued again to resume from its last checkpoint",
                   level="warn")
            return True

    def reap(self, now: datetime | None = None) -> int:
        """Jobs whose worker stopped renewing its lease. A validation goes back to the queue's
        head; a run is queued again to resume from its last checkpoint, once
        (``MAX_ATTEMPTS``), then fails with ``worker_lost``. How many were found."""
        now = now or datetime.now(UTC)
        with Session(self.db) as s, s.begin():
            rows = s.scalars(select(JobRow).where(
                JobRow.status.in_(("validating_files", "running")), JobRow.lease_until < now)
                .with_for_update(skip_locked=True)).all()
            for row in rows:
                lost = row.worker
                if row.status == "validating_files":
                    row.worker, row.lease_until = None, None
                    _event(s, row.id, f"worker {lost} stopped while validating; validating again",
                           level="warn")
                    continue
                last = s.scalar(select(func.max(JobCheckpointRow.epoch)).filter_by(job_id=row.id))
                stopped = (f"the worker running this job ({lost}) stopped renewing its lease at "
                           f"{as_utc(row.lease_until or now).isoformat()}"
                           + (f" after epoch {last}" if last else ""))
                publishing = row.extra.get("publishing")
                if not publishing and row.extra.get("attempts", 1) < MAX_ATTEMPTS:
                    row.status, row.worker, row.lease_until = "queued", None, None
                    _event(s, row.id, f"{stopped}; queued again to resume from "
                           + ("its last checkpoint" if last else "the start"), level="warn")
                    continue
                published = ("it was publishing: a version of " + row.extra.get("adapter", "?")
                             + " may exist whole (a push is atomic)" if publishing
                             else "nothing was published")
                tries = "" if publishing else f" (attempt {row.extra.get('attempts', 1)} of {MAX_ATTEMPTS})"
                self._fail(s, row, "worker_lost",
                           f"{stopped}{tries}; {published}; its events and checkpoints are kept: "
                           "create the job again to train it")
            return len(rows)

    def referenced_blobs(self) -> set[str]:
        """The blobs of every checkpoint (garbage collection keeps them)."""
        with Session(self.db) as s:
            return {d for files in s.scalars(select(JobCheckpointRow.files)) for d in files.values()}

    # -- rows ------------------------------------------------------------------------------

    def _fail(self, s: Session, row: JobRow, code: str, message: str, param: str | None = None) -> None:
        row.status, row.error = "failed", {"code": code, "message": message, "param": param}
        row.finished_at, row.lease_until = datetime.now(UTC), None
        _event(s, row.id, f"Job failed: {message}", level="error")
        record(s, self.actor, "job.fail", f"{self._tenant_name(s, row)}/{row.id}", code=code)

    @staticmethod
    def _owned(s: Session, job_id: str, worker: str, status: str | None) -> JobRow | None:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is None or row.worker != worker or row.status not in ((status,) if status else ACTIVE):
            return None
        return row

    @staticmethod
    def _row(s: Session, tenant_id: int, job_id: str, *, lock: bool = False) -> JobRow:
        row = s.get(JobRow, job_id, with_for_update=lock) if len(job_id) <= 40 else None
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"No such fine-tuning job: {job_id}")
        return row

    @staticmethod
    def _tenant_name(s: Session, row: JobRow) -> str:
        return s.get(TenantRow, row.tenant_id).name  # type: ignore[union-attr]  # a foreign key


def _event(s: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
           data: dict[str, Any] | None = None) -> None:
    s.add(JobEventRow(job_id=job_id, created_at=datetime.now(UTC), level=level, type=type,
                      message=message[:4000], data=data))


__all__ = ["ACTIVE", "FINISHED", "METHODS", "Checkpoint", "Job", "JobEvent", "JobLimits",
           "JobRequest", "Jobs"]
