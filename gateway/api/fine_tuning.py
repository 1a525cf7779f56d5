"""OpenAI's files and fine-tuning jobs API, per tenant: ``/v1/files`` and ``/v1/fine_tuning/jobs``.

Thin: each route authenticates the tenant, parses, and calls the registry's ``files`` or
``jobs`` service (in a thread: the registry is synchronous). The registry checks what the
tenant sent (every bad line of a file, every bad field of a job) and the tenant's limits
(``max_file_bytes``: 413; ``max_queued_jobs``: 429 with ``Retry-After``); its errors become
OpenAI's envelope in the app's one handler. Training runs in workers
(``lora-gateway worker``, or ``serve --worker``), never in the gateway.

Beyond OpenAI's fields a job takes ``gates`` (send it with the SDK's ``extra_body``): the
trainer's gates the adapter must pass to be published (``JobGates``: validation perplexity,
DPO's preference accuracy and margin, a golden file's answers, a regression file's prompts
against the base).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from adapters_registry import JobLimits, JobRequest
from gateway.api.deps import ServicesDep, TenantDep
from gateway.errors import InvalidRequestError, PayloadTooLargeError, documented

router = APIRouter()
FILES_PATH = "/v1/files"
MULTIPART_OVERHEAD = 64 * 1024  # the form's boundaries and fields around the file itself
_ERRORS = documented(400, 401, 404, 429)


def is_file_upload(path: str) -> bool:
    """The upload route streams bodies bigger than a request and checks its tenant's limit."""
    return path == FILES_PATH


# -- files ---------------------------------------------------------------------------------

@router.post(FILES_PATH, responses={**documented(400, 401, 413)}, openapi_extra={"requestBody": {
    "required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "purpose": {"type": "string", "enum": ["fine-tune"]}}}}}}})
async def upload_file(request: Request, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    """Upload a JSONL fine-tuning file, checked whole: every bad line is named, nothing kept."""
    limit = (await services.quotas.limits(tenant)).max_file_bytes or 0
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise PayloadTooLargeError(f"the upload is {declared} bytes, over this tenant's "
                                   f"{limit}-byte limit for a fine-tuning file")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("upload the file as multipart/form-data with fields 'file' "
                                  "and 'purpose', as OpenAI's SDK does")
    try:
        form = await MultiPartParser(request.headers, _limited(request, limit + MULTIPART_OVERHEAD),
                                     max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise InvalidRequestError(f"malformed multipart upload: {exc.message}") from None
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile) or not isinstance(purpose, str):
            raise InvalidRequestError("the upload needs a 'file' part and a 'purpose' field",
                                      param="file" if not isinstance(upload, UploadFile) else "purpose")
        data = await upload.read()
        filename = upload.filename or "upload.jsonl"
    finally:
        await form.close()
    file = await asyncio.to_thread(services.tenant_registry.files.create, tenant.name, filename,
                                   purpose, data, max_bytes=limit)
    return file.as_openai()


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLargeError(f"the upload exceeds this tenant's {limit}-byte limit "
                                       "for a fine-tuning file")
        yield chunk


@router.get(FILES_PATH, responses=_ERRORS)
async def list_files(tenant: TenantDep, services: ServicesDep, purpose: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10000)] = 10000, after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    files = await asyncio.to_thread(services.tenant_registry.files.list, tenant.name, purpose=purpose,
                                    limit=limit + 1, after=after, order=order)
    return _page([f.as_openai() for f in files[:limit]], len(files) > limit)


@router.get(FILES_PATH + "/{file_id}", responses=_ERRORS)
async def retrieve_file(file_id: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    file = await asyncio.to_thread(services.tenant_registry.files.get, tenant.name, file_id)
    return file.as_openai()


@router.get(FILES_PATH + "/{file_id}/content", responses=_ERRORS, response_class=Response)
async def file_content(file_id: str, tenant: TenantDep, services: ServicesDep) -> Response:
    data = await asyncio.to_thread(services.tenant_registry.files.read, tenant.name, file_id)
    return Response(data, media_type="application/jsonl")


@router.delete(FILES_PATH + "/{file_id}", responses=_ERRORS)
async def delete_file(file_id: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    file = await asyncio.to_thread(services.tenant_registry.files.delete, tenant.name, file_id)
    return {"id": file.id, "object": "file", "deleted": True}


# -- jobs ----------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Hyperparameters(_Strict):
    # The values are checked by the registry with the method (every problem at once).
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class JobMethod(_Strict):
    type: Literal["supervised", "dpo"]
    supervised: _Hyperparameters | None = None
    dpo: _Hyperparameters | None = None


class JobGates(_Strict):
    """What the adapter must pass to be published (the trainer's gates); unset: not checked,
    except DPO's preference gates, whose defaults apply."""

    max_val_perplexity: float | None = Field(default=None, gt=0,
                                             description="Validation perplexity at most this.")
    preference_min_accuracy: float | None = Field(default=None, ge=0, le=1,
                                                  description="DPO: held-out pairs preferred right.")
    preference_min_margin: float | None = Field(default=None,
                                                description="DPO: mean held-out reward margin.")
    golden_file: str | None = Field(default=None, max_length=64, description=(
        "A file (supervised format) whose answers the adapter must reproduce exactly, greedy."))
    golden_min_score: float | None = Field(default=None, ge=0, le=1,
                                           description="Share of golden answers reproduced (default 1).")
    regression_file: str | None = Field(default=None, max_length=64, description=(
        "A file (supervised format) whose prompts the adapter must answer nearly as the base does "
        "(its answers are not used)."))
    regression_max_kl: float | None = Field(default=None, gt=0, description=(
        "Mean per-token KL(base || adapter) on the regression prompts, in nats (default 0.5)."))
    regression_min_agreement: float | None = Field(default=None, ge=0, le=1, description=(
        "Share of regression prompts answered exactly as the base does."))

    def split(self) -> tuple[dict[str, float], dict[str, str]]:
        values: dict[str, Any] = self.model_dump(exclude_none=True)
        files: dict[str, str] = {k: values.pop(k) for k in ("golden_file", "regression_file") if k in values}
        return values, files


class JobCreate(_Strict):
    """OpenAI's fine-tuning job body; ``gates`` is this gateway's."""

    model: str = Field(max_length=300)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: dict[str, Any] | None = Field(
        default=None, description="Deprecated by OpenAI for method.supervised.hyperparameters.")
    suffix: str | None = Field(default=None, max_length=64,
                               description="The adapter the job publishes a version of (else ft-<job>).")
    seed: int | None = None
    method: JobMethod | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)
    integrations: list[Any] | None = None
    gates: JobGates = Field(default_factory=JobGates, description="The trainer's gates to pass.")

    def request(self) -> JobRequest:
        if self.integrations:
            raise InvalidRequestError("integrations are not served here: follow a job with its "
                                      "events", param="integrations")
        method = self.method.type if self.method else "supervised"
        given = getattr(self.method, method, None) if self.method else None
        if self.hyperparameters is not None and (method != "supervised" or given is not None):
            raise InvalidRequestError("give hyperparameters once: in method.<type>.hyperparameters "
                                      "(the top-level field is for supervised jobs only)",
                                      param="hyperparameters")
        hyperparameters = given.hyperparameters if given is not None else (self.hyperparameters or {})
        gates, eval_files = self.gates.split()
        return JobRequest(model=self.model, training_file=self.training_file, method=method,
                          hyperparameters=hyperparameters, validation_file=self.validation_file,
                          suffix=self.suffix, seed=self.seed, metadata=self.metadata, gates=gates,
                          eval_files=eval_files)


JOBS_PATH = "/v1/fine_tuning/jobs"


@router.post(JOBS_PATH, responses=_ERRORS)
async def create_job(body: JobCreate, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    """Queue a fine-tuning job of the served base (or one of the tenant's own adapters)."""
    settings = services.settings
    limits = await services.quotas.limits(tenant)
    job = await asyncio.to_thread(
        services.tenant_registry.jobs.create, tenant.name, body.request(),
        base_model_id=settings.base_model_id, base_names=_base_names(settings),
        limits=JobLimits(limits.max_queued_jobs, limits.max_running_jobs, limits.max_training_tokens),
        template_id=settings.fine_tuning_template)
    return job.as_openai()


@router.get(JOBS_PATH, responses=_ERRORS)
async def list_jobs(request: Request, tenant: TenantDep, services: ServicesDep, after: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    # OpenAI's SDK sends metadata filters as metadata[key]=value
    metadata = {k[9:-1]: v for k, v in request.query_params.items()
                if k.startswith("metadata[") and k.endswith("]")}
    jobs, more = await asyncio.to_thread(services.tenant_registry.jobs.list, tenant.name, after=after,
                                         limit=limit, metadata=metadata or None)
    return _page([j.as_openai() for j in jobs], more)


@router.get(JOBS_PATH + "/{job_id}", responses=_ERRORS)
async def retrieve_job(job_id: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    return (await asyncio.to_thread(services.tenant_registry.jobs.get, tenant.name, job_id)).as_openai()


@router.post(JOBS_PATH + "/{job_id}/cancel", responses={**_ERRORS, **documented(409)})
async def cancel_job(job_id: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    """Cancelled at once; a running job's worker stops at its next step and publishes nothing."""
    return (await asyncio.to_thread(services.tenant_registry.jobs.cancel, tenant.name, job_id)).as_openai()


@router.get(JOBS_PATH + "/{job_id}/events", responses=_ERRORS)
async def job_events(job_id: str, tenant: TenantDep, services: ServicesDep, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
    """Newest first: progress per epoch (losses), the data report, every gate's result."""
    events, more = await asyncio.to_thread(services.tenant_registry.jobs.events, tenant.name, job_id,
                                           after=after, limit=limit)
    return _page([e.as_openai() for e in events], more)


@router.get(JOBS_PATH + "/{job_id}/checkpoints", responses=_ERRORS)
async def job_checkpoints(job_id: str, tenant: TenantDep, services: ServicesDep, after: str | None = None,
                          limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
    """One per epoch, newest first; each one's LoRA weights are kept in the artifact store."""
    checkpoints, more = await asyncio.to_thread(services.tenant_registry.jobs.checkpoints, tenant.name,
                                                job_id, after=after, limit=limit)
    return _page([c.as_openai(tenant.name) for c in checkpoints], more)


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _base_names(settings: Any) -> tuple[str, ...]:
    return tuple({settings.base_name, settings.base_model_id})


__all__ = ["is_file_upload", "router"]
