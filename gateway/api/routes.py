"""Routes: parse, authorize, call one service method."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import ServicesDep, TenantDep
from gateway.api.guard import GuardDep
from gateway.schemas import ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList

router = APIRouter()
TIER_HEADER = "x-lora-gateway-adapter-tier"


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, tenant: TenantDep,
                           services: ServicesDep, guard: GuardDep) -> Response:
    body = guard.check(body)
    await guard.admit()
    if body.stream:
        events, tier = await services.chat.stream(tenant, body)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={TIER_HEADER: tier, "cache-control": "no-cache"})
    result, tier = await services.chat.complete(tenant, body)
    return JSONResponse(result.model_dump(), headers={TIER_HEADER: tier})


@router.get("/v1/models", response_model=ModelList)
async def list_models(tenant: TenantDep, services: ServicesDep) -> ModelList:
    settings = services.settings
    now = int(time.time())
    cards = []
    if settings.expose_base:
        cards.append(ModelCard(id=settings.base_name, created=now, owned_by="lora-gateway"))
    for info in await services.tenants.list_adapters(tenant):
        created = int(info.created_at.timestamp())
        cards.append(ModelCard(id=info.name, created=created, owned_by=tenant.name,
                               root=info.name, parent=settings.base_name))
        for alias in sorted(info.aliases):
            cards.append(ModelCard(id=f"{info.name}:{alias}", created=created,
                                   owned_by=tenant.name, root=info.name, parent=settings.base_name))
        for v in info.versions:
            cards.append(ModelCard(id=f"{info.name}@v{v}", created=created,
                                   owned_by=tenant.name, root=info.name, parent=settings.base_name))
    return ModelList(data=cards)


@router.get("/health")
@router.get("/health/ready")
async def ready(services: ServicesDep) -> JSONResponse:
    """Readiness: send traffic here. False while draining or once the engine died."""
    if services.ready and not services.draining and services.chat.engine_alive():
        return JSONResponse({"status": "ok"})
    status = "draining" if services.draining else "unavailable"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/health/live")
async def live(services: ServicesDep) -> JSONResponse:
    """Liveness: the event loop answers and the engine runs; never fails for being busy."""
    if services.chat.engine_alive():
        return JSONResponse({"status": "alive"})
    return JSONResponse({"status": "engine dead"}, status_code=503)


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    m = services.metrics
    m.ready.set(1 if services.ready else 0)
    running, _capacity = services.adapters.engine_state()
    m.lora_requests_info.clear()
    m.lora_requests_info.labels(",".join(running), str(services.settings.max_loras), "").set(time.time())
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
