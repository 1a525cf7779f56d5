"""The fine-tuning job queue, the workers' side of ``jobs``: a worker claims a job, renews
its lease, reports events, checkpoints and the outcome; a lost worker's job is reaped.

``claim`` takes first any job still validating its files (quick, and it tells the tenant
early what is wrong with the data), else the oldest queued job whose tenant runs fewer than
``max_running_jobs``. On PostgreSQL the claim takes rows ``FOR UPDATE SKIP LOCKED``, so
workers never wait on each other's rows, and locks the tenant's row while it counts that
tenant's running jobs, so two workers cannot both take a tenant's last slot; SQLite (the
embedded default) runs one worker. A claimed job carries a lease its worker renews
(``heartbeat``); a worker that stops renewing loses it (``reap``): a validation is handed
to the next worker, a training run is queued again and resumes from its last checkpoint,
once (``MAX_ATTEMPTS``); lost a second time it fails with ``worker_lost``.

Publication is one step the tenant can no longer cancel (``begin_publish``), then the
registry's own push: a version appears whole or not at all. Its manifest names the job
(``JOB_KEY``), so a worker lost between its push and its report leaves a job the reaper
finds succeeded, not failed.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from adapters_registry._audit import record
from adapters_registry.db import (
    AdapterRow,
    AdapterVersionRow,
    JobCheckpointRow,
    JobRow,
    TenantRow,
    as_utc,
)
from adapters_registry.errors import ConflictError, ValidationError
from adapters_registry.job_records import (
    ACTIVE,
    Checkpoint,
    Job,
    add_event,
    checkpoint_record,
    job_record,
    tenant_name,
)

__all__ = ["JOB_KEY", "MAX_ATTEMPTS", "JobQueue"]
MAX_ATTEMPTS = 2  # a run whose worker is lost resumes once from its checkpoint, then fails
JOB_KEY = "fine_tuning_job"  # in a published version's manifest metrics: the job that made it


class JobQueue:
    def __init__(self, db: Engine, *, actor: str) -> None:
        self.db = db
        self.actor = actor

    def pending(self, *, tenant: str | None = None, limit: int = 100) -> list[Job]:
        """Every tenant's unfinished jobs (validating, queued, running) in the order workers
        take them: validations first, then oldest first. The operator's view of the queue."""
        if not 1 <= limit <= 1000:
            raise ValidationError(f"limit {limit} is outside 1..1000")
        with Session(self.db) as s:
            query = (select(JobRow, TenantRow.name).join(TenantRow, JobRow.tenant_id == TenantRow.id)
                     .where(JobRow.status.in_(ACTIVE)))
            if tenant is not None:
                query = query.where(TenantRow.name == tenant)
            validating = JobRow.status == "validating_files"
            rows = s.execute(query.order_by(validating.desc(), JobRow.created_at, JobRow.id)
                             .limit(limit)).all()
            return [job_record(row, name) for row, name in rows]

    def depth(self) -> dict[str, int]:
        """How many jobs wait or run, by status (every tenant)."""
        with Session(self.db) as s:
            counts = dict(s.execute(select(JobRow.status, func.count()).where(
                JobRow.status.in_(ACTIVE)).group_by(JobRow.status)).tuples().all())
        return {status: int(counts.get(status, 0)) for status in ACTIVE}

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
                return job_record(row, tenant_name(s, row))
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
                add_event(s, row.id, "Fine-tuning job started"
                       + (f" (attempt {attempt}, resuming)" if attempt > 1 else ""))
                return job_record(row, tenant_name(s, row))
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
            add_event(s, job_id, message, level=level, type=type, data=data)

    def validated(self, job_id: str, worker: str, trained_tokens: int) -> bool:
        """The files are good: the job waits for a worker to train it (False: not ours now)."""
        with Session(self.db) as s, s.begin():
            row = self._owned(s, job_id, worker, "validating_files")
            if row is None:
                return False
            row.status, row.worker, row.lease_until = "queued", None, None
            row.trained_tokens = trained_tokens
            add_event(s, job_id, f"Files validated: {trained_tokens} training tokens; job queued",
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
            self._succeed(s, row, fine_tuned_model)

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
            add_event(s, job_id, f"worker {worker} {why}; queued again to resume from its last checkpoint",
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
                    add_event(s, row.id, f"worker {lost} stopped while validating; validating again",
                           level="warn")
                    continue
                last = s.scalar(select(func.max(JobCheckpointRow.epoch)).filter_by(job_id=row.id))
                stopped = (f"the worker running this job ({lost}) stopped renewing its lease at "
                           f"{as_utc(row.lease_until or now).isoformat()}"
                           + (f" after epoch {last}" if last else ""))
                publishing = row.extra.get("publishing")
                if not publishing and row.extra.get("attempts", 1) < MAX_ATTEMPTS:
                    row.status, row.worker, row.lease_until = "queued", None, None
                    add_event(s, row.id, f"{stopped}; queued again to resume from "
                              + ("its last checkpoint" if last else "the start"), level="warn")
                    continue
                version = _published(s, row) if publishing else None
                if version is not None:  # lost between its push and its report: it is done
                    self._succeed(s, row, version, f"{stopped}, after it had published {version}")
                    continue
                published = ("it was publishing, and no version was published" if publishing
                             else "nothing was published")
                tries = "" if publishing else f" (attempt {row.extra.get('attempts', 1)} of {MAX_ATTEMPTS})"
                self._fail(s, row, "worker_lost",
                           f"{stopped}{tries}; {published}; its events and checkpoints are kept: "
                           "create the job again to train it")
            return len(rows)

    # -- rows ------------------------------------------------------------------------------

    def _succeed(self, s: Session, row: JobRow, fine_tuned_model: str, note: str = "") -> None:
        row.status, row.fine_tuned_model = "succeeded", fine_tuned_model
        row.finished_at, row.lease_until = datetime.now(UTC), None
        if note:
            add_event(s, row.id, note, level="warn")
        add_event(s, row.id, f"New fine-tuned model created: {fine_tuned_model}")
        add_event(s, row.id, "The job has successfully completed")
        record(s, self.actor, "job.succeed", f"{tenant_name(s, row)}/{row.id}",
               fine_tuned_model=fine_tuned_model)

    def _fail(self, s: Session, row: JobRow, code: str, message: str, param: str | None = None) -> None:
        row.status, row.error = "failed", {"code": code, "message": message, "param": param}
        row.finished_at, row.lease_until = datetime.now(UTC), None
        add_event(s, row.id, f"Job failed: {message}", level="error")
        record(s, self.actor, "job.fail", f"{tenant_name(s, row)}/{row.id}", code=code)

    @staticmethod
    def _owned(s: Session, job_id: str, worker: str, status: str | None) -> JobRow | None:
        row = s.get(JobRow, job_id, with_for_update=True)
        if row is None or row.worker != worker or row.status not in ((status,) if status else ACTIVE):
            return None
        return row


def _published(s: Session, row: JobRow) -> str | None:
    """The version a job's worker pushed (its manifest names the job: ``JOB_KEY``), as
    ``name@vN``; None if it has none."""
    name = row.extra.get("adapter")
    adapter = s.scalar(select(AdapterRow).filter_by(tenant_id=row.tenant_id, name=name))
    if adapter is None:
        return None
    for version in s.scalars(select(AdapterVersionRow).filter_by(adapter_id=adapter.id)
                             .where(AdapterVersionRow.state != "deleted")
                             .order_by(AdapterVersionRow.version.desc())):
        if version.trainer_metrics.get(JOB_KEY) == row.id:
            return f"{name}@v{version.version}"
    return None
