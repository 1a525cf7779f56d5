"""What a fine-tuning job is, as the tenant asks for it and as it is handed out
(``jobs.Jobs``): the request and its checks, the records, and OpenAI's shapes of them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from adapters_registry.db import JobCheckpointRow, JobEventRow, JobRow, TenantRow, as_utc, as_utc_or_none
from adapters_registry.errors import ValidationError
from adapters_registry.files import FileObject
from adapters_registry.names import validate_name

METHODS = ("supervised", "dpo")
WAITING = ("validating_files", "queued")
ACTIVE = (*WAITING, "running")
FINISHED = ("succeeded", "failed", "cancelled")
# OpenAI's hyperparameters per method, each "auto" or a number in its bounds.
HYPERPARAMETERS: dict[str, tuple[type, float, float]] = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 0, 10),
    "beta": (float, 0, 2),
}
METHOD_HYPERPARAMETERS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                          "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")}
SHAPE_KEYS = frozenset({"r", "rank", "lora_r", "lora_rank", "alpha", "lora_alpha", "target_modules",
                        "lora_target_modules", "modules_to_save", "use_dora", "use_rslora"})
# Gates a job may tighten (our extension: the body's ``gates``), as the trainer's RunConfig names them.
GATES = ("max_val_perplexity", "preference_min_accuracy", "preference_min_margin", "golden_min_score",
         "regression_max_kl", "regression_min_agreement")
# Eval sets a job may give (file ids, supervised format): golden answers it must reproduce,
# and prompts it must answer nearly as the base does (the files' own answers are not used).
EVAL_FILES = ("golden_file", "regression_file")
QUEUE_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class JobRequest:
    """What a tenant asks for, as OpenAI's create call carries it."""

    model: str
    training_file: str
    method: str = "supervised"
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: Mapping[str, str] | None = None
    gates: Mapping[str, float] = field(default_factory=dict)
    eval_files: Mapping[str, str] = field(default_factory=dict)  # golden_file, regression_file


@dataclass(frozen=True)
class JobLimits:
    max_queued_jobs: int | None
    max_running_jobs: int | None
    max_training_tokens: int | None


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    model: str
    template_id: str
    init_version: str | None  # tenant/name@vN a run continues, or None (from the base)
    method: str
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    gates: dict[str, float]
    eval_files: dict[str, str]
    limits: JobLimits
    adapter_name: str  # where the result is published: TENANT/adapter_name@vN
    status: str
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    worker: str | None
    created_at: datetime
    finished_at: datetime | None

    def as_openai(self) -> dict[str, Any]:
        hyperparameters = {k: self.hyperparameters.get(k, "auto")
                           for k in METHOD_HYPERPARAMETERS[self.method]}
        return {
            "object": "fine_tuning.job", "id": self.id, "model": self.model,
            "created_at": int(self.created_at.timestamp()),
            "finished_at": None if self.finished_at is None else int(self.finished_at.timestamp()),
            "fine_tuned_model": self.fine_tuned_model, "organization_id": self.tenant,
            "result_files": [], "status": self.status, "error": self.error,
            "training_file": self.training_file, "validation_file": self.validation_file,
            "trained_tokens": self.trained_tokens, "seed": self.seed, "estimated_finish": None,
            "integrations": None, "metadata": self.metadata, "user_provided_suffix": self.suffix,
            "hyperparameters": {k: v for k, v in hyperparameters.items() if k != "beta"},
            "method": {"type": self.method, self.method: {"hyperparameters": hyperparameters}},
        }


@dataclass(frozen=True)
class JobEvent:
    id: int
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    def as_openai(self) -> dict[str, Any]:
        return {"object": "fine_tuning.job.event", "id": f"ftevent-{self.id}",
                "created_at": int(self.created_at.timestamp()), "level": self.level,
                "message": self.message, "data": self.data or {}, "type": self.type}


@dataclass(frozen=True)
class Checkpoint:
    id: str
    job_id: str
    step: int
    epoch: int
    metrics: dict[str, Any]
    files: dict[str, str]
    created_at: datetime

    def as_openai(self, tenant: str) -> dict[str, Any]:
        return {"object": "fine_tuning.job.checkpoint", "id": self.id,
                "created_at": int(self.created_at.timestamp()), "fine_tuning_job_id": self.job_id,
                "fine_tuned_model_checkpoint": f"{tenant}/{self.job_id}:{self.id}",
                "step_number": self.step, "metrics": {"step": self.step, **self.metrics}}


FORMAT_NAMES = {"supervised": "chat examples ('messages' lines)",
                 "dpo": "preference pairs ('input', 'preferred_output', 'non_preferred_output' lines)"}


def described(file: FileObject) -> str:
    return f"{file.examples} {FORMAT_NAMES[file.format]}"


def request_problems(request: JobRequest) -> list[str]:
    problems = []
    if request.method not in METHODS:
        problems.append(f"method.type {request.method!r}: use one of {list(METHODS)}")
    allowed = METHOD_HYPERPARAMETERS.get(request.method, ())
    for key, value in request.hyperparameters.items():
        if key in SHAPE_KEYS:
            problems.append(f"hyperparameters.{key}: an adapter's shape (rank, alpha, target "
                            "modules) is fixed by the base's adapter template, the same for every "
                            "tenant so that all adapters share the engine's batches; it cannot be set")
        elif key not in allowed:
            problems.append(f"hyperparameters.{key}: not a {request.method} hyperparameter "
                            f"(use {', '.join(allowed)})")
        elif value != "auto":
            kind, low, high = HYPERPARAMETERS[key]
            if kind is int:
                ok = not isinstance(value, bool) and isinstance(value, int) and low <= value <= high
            else:
                ok = (not isinstance(value, bool) and isinstance(value, int | float)
                      and math.isfinite(value) and low < value <= high)
            if not ok:
                what = "a whole number" if kind is int else "a number"
                problems.append(f"hyperparameters.{key}: {value!r}; give 'auto' or {what} "
                                f"{'in' if kind is int else 'above'} {low:g}"
                                f"{'..' if kind is int else ' and at most '}{high:g}")
    if request.suffix is not None:
        try:
            validate_name("adapter", request.suffix)
        except ValidationError as exc:
            problems.append(f"suffix: {exc} (the suffix names the adapter the job publishes)")
    if request.seed is not None and (isinstance(request.seed, bool) or not 0 <= request.seed < 2**31):
        problems.append(f"seed {request.seed!r}: a whole number in 0..2147483647")
    for key, value in request.gates.items():
        if key not in GATES:
            problems.append(f"gates.{key}: not a gate (use {', '.join(GATES)})")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"gates.{key}: a number, got {type(value).__name__}")
    if request.method == "supervised" and any(k.startswith("preference_") for k in request.gates):
        problems.append("gates: the preference gates apply to method 'dpo' only")
    for key in request.eval_files:
        if key not in EVAL_FILES:
            problems.append(f"gates.{key}: not an eval file (use {', '.join(EVAL_FILES)})")
    for prefix, file_key in (("golden_", "golden_file"), ("regression_", "regression_file")):
        if any(k.startswith(prefix) for k in request.gates) and file_key not in request.eval_files:
            problems.append(f"gates: the {prefix.rstrip('_')} gates need gates.{file_key}")
    if request.validation_file is not None and request.validation_file == request.training_file:
        problems.append("validation_file is the training file: validation must be held out")
    return problems


def job_record(row: JobRow, tenant: str) -> Job:
    extra = row.extra or {}
    limits = extra.get("limits", {})
    return Job(
        id=row.id, tenant=tenant, model=row.model, template_id=row.template_id,
        init_version=extra.get("init"), method=row.method, hyperparameters=dict(row.hyperparameters),
        training_file=row.training_file, validation_file=row.validation_file, suffix=row.suffix,
        seed=row.seed, metadata=extra.get("metadata"), gates=dict(extra.get("gates") or {}),
        eval_files=dict(extra.get("eval_files") or {}),
        limits=JobLimits(None, limits.get("max_running_jobs"), limits.get("max_training_tokens")),
        adapter_name=extra.get("adapter", ""), status=row.status, error=row.error,
        fine_tuned_model=row.fine_tuned_model, trained_tokens=row.trained_tokens, worker=row.worker,
        created_at=as_utc(row.created_at), finished_at=as_utc_or_none(row.finished_at))


def checkpoint_record(row: JobCheckpointRow) -> Checkpoint:
    return Checkpoint(row.id, row.job_id, row.step, row.epoch, dict(row.metrics), dict(row.files),
                      as_utc(row.created_at))


def add_event(s: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
    """One event of the job's (its worker's or the registry's), in the caller's transaction."""
    s.add(JobEventRow(job_id=job_id, created_at=datetime.now(UTC), level=level, type=type,
                      message=message[:4000], data=data))


def tenant_name(s: Session, row: JobRow) -> str:
    return s.get_one(TenantRow, row.tenant_id).name


__all__ = ["ACTIVE", "EVAL_FILES", "FINISHED", "FORMAT_NAMES", "METHODS", "WAITING", "Checkpoint", "Job",
           "JobEvent", "JobLimits", "JobRequest", "add_event", "checkpoint_record", "described", "job_record",
           "request_problems", "tenant_name"]
