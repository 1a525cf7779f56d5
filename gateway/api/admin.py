"""Admin HTTP API (/admin/v1): the registry's management operations over HTTP.

Its own identity: one admin key from the settings, never a tenant key. Without a
configured admin key every route answers 404, as if the API were not there.
Adapters are uploaded as a .tar, .tar.gz or .zip body and run through exactly the check
``registry push`` runs.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from adapters_registry import (
    REPAIR_COMMAND,
    GcReport,
    Registry,
    SourceError,
    TenantLimits,
    split_from_labels,
)
from gateway.api.admin_models import (
    AdapterList,
    AdapterRefIn,
    AliasIn,
    AliasSet,
    AuditPage,
    CacheState,
    EvictIn,
    EvictOut,
    GcIn,
    JobQueueOut,
    KeyCreated,
    KeyIn,
    KeyList,
    LimitsIn,
    LimitsOut,
    PinOut,
    PrefetchIn,
    PrefetchOut,
    PrefetchResult,
    QueuedJob,
    Revoked,
    RolloutIn,
    RolloutOut,
    TenantIn,
    TenantList,
    TenantOut,
    UnpinOut,
    UsagePage,
    UsageRow,
    VerifyOut,
    VersionCreated,
    VersionState,
)
from gateway.api.deps import Services, ServicesDep, check_admin
from gateway.errors import (
    GatewayError,
    PayloadTooLargeError,
    documented,
)

# Every admin route: a wrong key (401), a tenant, adapter or route that is not there (404),
# the registry's database or store down (503); routes add what else they answer.
router = APIRouter(prefix="/admin/v1", responses=documented(401, 404, 503))
_INPUT = documented(400, 413)  # a body, path or query parameter to validate
_CHANGE = documented(400, 409, 413)  # ... that may also conflict with the registry's state


async def require_admin(request: Request, services: ServicesDep) -> Services:
    check_admin(request, services)
    return services


async def admin_registry(services: Annotated[Services, Depends(require_admin)]) -> Registry:
    return services.admin_registry


AdminDep = Annotated[Registry, Depends(admin_registry)]
AdminServicesDep = Annotated[Services, Depends(require_admin)]


async def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)  # the registry is synchronous


@router.get("/tenants")
async def list_tenants(reg: AdminDep) -> TenantList:
    return TenantList(data=[t.name for t in await _run(reg.list_tenants)])


@router.post("/tenants", status_code=201, responses=_CHANGE)
async def create_tenant(body: TenantIn, reg: AdminDep) -> TenantOut:
    return TenantOut(name=(await _run(reg.create_tenant, body.name)).name)


@router.post("/tenants/{tenant}/keys", status_code=201, responses=_INPUT)
async def create_key(tenant: str, body: KeyIn, reg: AdminDep) -> KeyCreated:
    expires = (datetime.now(UTC) + timedelta(days=body.expires_in_days)
               if body.expires_in_days else None)
    key = await _run(reg.create_api_key, tenant, expires_at=expires)
    return KeyCreated(key=key, prefix=key[:10], expires_at=expires)


@router.get("/tenants/{tenant}/keys", responses=_INPUT)
async def list_keys(tenant: str, reg: AdminDep) -> KeyList:
    return KeyList(data=await _run(reg.list_api_keys, tenant))


@router.delete("/tenants/{tenant}/keys/{prefix}", responses=_INPUT)
async def revoke_key(tenant: str, prefix: str, reg: AdminDep) -> Revoked:
    return Revoked(revoked=await _run(reg.revoke_api_key, tenant, prefix))


@router.get("/tenants/{tenant}/limits", responses=_INPUT)
async def get_limits(tenant: str, reg: AdminDep) -> LimitsOut:
    return LimitsOut(**asdict(await _run(reg.get_limits, tenant)))


@router.put("/tenants/{tenant}/limits", responses=_INPUT)
async def set_limits(tenant: str, body: LimitsIn, reg: AdminDep, svc: AdminServicesDep) -> LimitsOut:
    """Replace the tenant's limits; every replica applies them within resolve_ttl_seconds."""
    limits = await _run(reg.set_limits, tenant, TenantLimits(**body.model_dump()))
    svc.quotas.forget(await _run(reg.get_tenant, tenant))
    return LimitsOut(**asdict(limits))


@router.get("/tenants/{tenant}/adapters", responses=_INPUT)
async def list_adapters(tenant: str, reg: AdminDep) -> AdapterList:
    t = await _run(reg.get_tenant, tenant)
    return AdapterList(data=await _run(reg.list_adapters, t))


@router.put("/tenants/{tenant}/adapters/{name}/aliases/{alias}", responses=_CHANGE)
async def set_alias(tenant: str, name: str, alias: str, body: AliasIn, reg: AdminDep) -> AliasSet:
    if body.weights is not None:
        await _run(reg.set_split, tenant, name, alias, split_from_labels(body.weights))
    else:
        assert body.version is not None, "validated: one of the two"
        await _run(reg.set_alias, tenant, name, alias, body.version)
    t = await _run(reg.get_tenant, tenant)
    (info,) = [a for a in await _run(reg.list_adapters, t) if a.name == name]
    return AliasSet(alias=f"{tenant}/{name}:{alias}", version=info.aliases[alias],
                    weights=info.splits.get(alias))


_ROLLOUT = "/tenants/{tenant}/adapters/{name}/aliases/{alias}/rollout"


@router.post(_ROLLOUT, responses=_CHANGE)
async def start_rollout(tenant: str, name: str, alias: str, body: RolloutIn,
                        reg: AdminDep) -> RolloutOut:
    """Roll ``version`` out under the alias, step by step (docs/registry.md)."""
    return RolloutOut.of(await _run(reg.rollouts.start, tenant, name, alias, body.version,
                                    body.steps, body.rules()))


@router.get(_ROLLOUT, responses=_INPUT)
async def rollout_status(tenant: str, name: str, alias: str, reg: AdminDep) -> RolloutOut:
    """The alias's active rollout, else its latest: state, step, evidence, reason."""
    return RolloutOut.of(await _run(reg.rollouts.get, tenant, name, alias))


@router.post(_ROLLOUT + "/{action}", responses=_CHANGE)
async def steer_rollout(tenant: str, name: str, alias: str,
                        action: Literal["pause", "resume", "abort"], reg: AdminDep) -> RolloutOut:
    """Hold the step, judge again, or put everyone back on the stable version."""
    return RolloutOut.of(await _run(getattr(reg.rollouts, action), tenant, name, alias))


_UPLOAD_PATH = re.compile(r"/admin/v1/tenants/[^/]+/adapters/[^/]+/versions")


def is_upload_path(path: str) -> bool:
    """The upload route streams archives bigger than a request body and checks its own limit."""
    return _UPLOAD_PATH.fullmatch(path) is not None


_ARCHIVE = {"requestBody": {"required": True, "description": "A .tar, .tar.gz or .zip of a PEFT "
                            "adapter folder.", "content": {"application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}}}}}


@router.post("/tenants/{tenant}/adapters/{name}/versions", status_code=201,
             responses={**_CHANGE, **documented(422)}, openapi_extra=_ARCHIVE)
async def upload_version(tenant: str, name: str, request: Request, reg: AdminDep,
                         template: str | None = None, base: str | None = None,
                         alias: Annotated[list[str] | None, Query()] = None) -> VersionCreated:
    """Register a new version from an uploaded .tar, .tar.gz or .zip (the request body)."""
    limits = await _run(reg.intake_limits, template, base)
    limit, basis = limits.max_archive_bytes, limits.basis
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the upload is {declared} bytes, over the {limit}-byte "
                                   f"limit{basis}")
    folder = Path(await _run(tempfile.mkdtemp, prefix="lgw-upload-"))
    try:
        archive = folder / "upload"
        with await _run(archive.open, "wb") as out:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise PayloadTooLargeError(f"the upload exceeds the {limit}-byte limit{basis}")
                await _run(out.write, chunk)
        try:
            version = await _run(reg.push, tenant, name, archive, template_id=template, base=base,
                                 aliases=alias or [])
        except SourceError as exc:  # it names the server's temporary file: say "the upload"
            raise SourceError(str(exc).replace(repr(str(archive)), "the upload")
                              .replace(str(archive), "the upload")) from None
    finally:
        await _run(shutil.rmtree, folder, ignore_errors=True)
    return VersionCreated(version=version.ref, lora_int_id=version.lora_int_id,
                          content_sha256=version.content_sha256, files=version.files)


@router.post("/tenants/{tenant}/adapters/{name}/versions/{version}/deprecate", responses=_CHANGE)
async def deprecate(tenant: str, name: str, version: int, reg: AdminDep) -> VersionState:
    await _run(reg.deprecate_version, tenant, name, version)
    return VersionState(version=f"{tenant}/{name}@v{version}", state="deprecated")


@router.delete("/tenants/{tenant}/adapters/{name}/versions/{version}", responses=_CHANGE)
async def delete_version(tenant: str, name: str, version: int, reg: AdminDep) -> VersionState:
    await _run(reg.delete_version, tenant, name, version)
    return VersionState(version=f"{tenant}/{name}@v{version}", state="deleted")


@router.get("/audit", responses=_INPUT)
async def audit(reg: AdminDep, subject: str | None = None, limit: int = 100) -> AuditPage:
    entries = await _run(reg.audit_log, subject_prefix=subject, limit=min(max(limit, 1), 1000))
    return AuditPage(data=entries)


@router.get("/usage", responses=_INPUT)
async def usage(reg: AdminDep, start: Annotated[datetime, Query(alias="from")],
                end: Annotated[datetime, Query(alias="to")], tenant: str | None = None) -> UsagePage:
    """Requests and tokens per tenant, model (the version that served) and minute in
    [from, to), summed over every replica: the ledger to bill from."""
    records = await _run(reg.usage, start, end, tenant=tenant)
    return UsagePage(data=[UsageRow(**r.as_dict()) for r in records])


@router.get("/fine_tuning/jobs", responses=_INPUT)
async def job_queue(reg: AdminDep, tenant: str | None = None, limit: int = 100) -> JobQueueOut:
    """Every tenant's unfinished fine-tuning jobs, validations first, then oldest first."""
    jobs = await _run(reg.job_queue.pending, tenant=tenant, limit=limit)
    return JobQueueOut(depth=await _run(reg.job_queue.depth), data=[QueuedJob(
        id=j.id, tenant=j.tenant, status=j.status, model=j.model, method=j.method, worker=j.worker,
        trained_tokens=j.trained_tokens, created_at=j.created_at) for j in jobs])


@router.post("/gc", responses=_INPUT)
async def gc(body: GcIn, reg: AdminDep) -> GcReport:
    report: GcReport = await _run(reg.collect_garbage, grace=timedelta(minutes=body.grace_minutes),
                                  dry_run=body.dry_run)
    return report


@router.get("/cache")
async def cache_state(svc: AdminServicesDep) -> CacheState:
    return CacheState(**svc.adapters.cache_state(), engine_reports=await svc.adapters.engine_reports(),
                      warmup_errors=svc.warmup_errors)


@router.post("/cache/prefetch", responses=_INPUT)
async def prefetch(body: PrefetchIn, svc: AdminServicesDep) -> PrefetchOut:
    """Warm each adapter into ``into``; one result per adapter, failures included."""
    results = []
    for ref in dict.fromkeys(body.adapters):
        try:
            version = await svc.tenants.resolve_ref(ref)
            before = await svc.adapters.prefetch(version, body.into)
            results.append(PrefetchResult(adapter=ref, version=version.ref, was=before, error=None))
        except GatewayError as exc:
            results.append(PrefetchResult(adapter=ref, version=None, was=None,
                                          error=exc.body()["error"]))
    return PrefetchOut(into=body.into, data=results,
                       failed=sum(1 for r in results if r.error is not None))


@router.post("/cache/pin", responses=_CHANGE)
async def pin(body: AdapterRefIn, svc: AdminServicesDep) -> PinOut:
    version = await svc.tenants.resolve_ref(body.adapter)
    was = await svc.adapters.pin(version)
    return PinOut(adapter=version.ref, was=was or "pinned")


@router.post("/cache/unpin", responses=_INPUT)
async def unpin(body: AdapterRefIn, svc: AdminServicesDep) -> UnpinOut:
    version = await svc.tenants.resolve_ref(body.adapter)
    return UnpinOut(adapter=version.ref, changed=svc.adapters.unpin(version))


@router.post("/cache/evict", responses=_CHANGE)
async def evict(body: EvictIn, svc: AdminServicesDep) -> EvictOut:
    version = await svc.tenants.resolve_ref(body.adapter)
    return EvictOut(adapter=version.ref, evicted_from=await svc.adapters.evict(version, body.where))


@router.post("/verify")
async def verify(reg: AdminDep) -> VerifyOut:
    """Re-hash every stored blob a live version uses; report the missing and corrupt ones."""
    report = await _run(reg.verify_blobs)
    return VerifyOut(checked=report.checked, problems=report.problems,
                     repair=f"{REPAIR_COMMAND} (on a machine with the adapter's original files)")
