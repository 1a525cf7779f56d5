"""Routes: parse, authorize, call one service method."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import ServicesDep, TenantDep, check_admin
from gateway.api.guard import GuardDep
from gateway.api.request import ScopeDep
from gateway.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ResponsesRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from gateway.engine.serving import Answer
from gateway.errors import InvalidRequestError, documented

router = APIRouter()
TIER_HEADER = "x-lora-gateway-adapter-tier"
_SSE = {"schema": {"type": "string", "description": "`data: {chunk}` events, then `data: [DONE]`; "
                  "an error after the first event is a last `data: {\"error\": …}` event."}}
_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "The answer as JSON, or with `stream` its server-sent events.",
          "content": {"application/json": {}, "text/event-stream": _SSE},
          "headers": {TIER_HEADER: {"description": "Where the adapter was: slot_hit, engine_hit, "
                                    "disk_hit, remote_fetch, or base.", "required": True,
                                    "schema": {"type": "string"}}}},
    **documented(400, 401, 404, 413, 429, 503),
}
_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
_PROBE: dict[int | str, dict[str, Any]] = {
    503: {"description": "Not ready (draining, engine dead).",
          "content": {"application/json": {"schema": _STATUS}}}}


@router.post("/v1/chat/completions", response_model=None, responses=_ANSWERS)
async def chat_completions(body: ChatCompletionRequest, scope: ScopeDep,
                           services: ServicesDep, guard: GuardDep) -> Response:
    body = guard.check(body)
    await guard.admit()
    return _respond(await guard.serve(services.openai.chat(scope, body)))


@router.post("/v1/completions", response_model=None, responses=_ANSWERS)
async def completions(body: CompletionRequest, scope: ScopeDep, services: ServicesDep,
                      guard: GuardDep) -> Response:
    body = guard.check(body)
    await guard.admit()
    return _respond(await guard.serve(services.openai.completion(scope, body)))


_RESPONSE_SSE = {"schema": {"type": "string", "description": "OpenAI's Responses events "
                           "(`event: {type}` and `data: {event}`); an error after the first "
                           "event is a last `error` event."}}
_RESPONSE_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {**_ANSWERS[200], "content": {"application/json": {}, "text/event-stream": _RESPONSE_SSE}},
    **documented(400, 401, 404, 413, 429, 503)}


@router.post("/v1/responses", response_model=None, responses=_RESPONSE_ANSWERS)
async def create_response(body: ResponsesRequest, scope: ScopeDep, services: ServicesDep,
                          guard: GuardDep) -> Response:
    """OpenAI's Responses API on the tenant's adapters (or the base), as vLLM serves it.
    With ``store`` (the default) the response is kept on this replica for its tenant only:
    for ``GET /v1/responses/{id}`` and ``previous_response_id``."""
    body = guard.check(body)
    await guard.admit()
    return _respond(await guard.serve(services.openai.responses(scope, body)))


@router.get("/v1/responses/{response_id}", responses=documented(400, 401, 404, 429, 503))
async def retrieve_response(response_id: str, scope: ScopeDep, services: ServicesDep,
                            guard: GuardDep, stream: bool = False,
                            starting_after: int | None = None) -> JSONResponse:
    """One of the caller's stored responses; another tenant's id is 404, as a missing one."""
    if stream:
        raise InvalidRequestError("only background responses can be streamed again, and this "
                                  "gateway serves none", param="stream")
    return JSONResponse(await services.openai.retrieve_response(scope, response_id))


@router.post("/v1/responses/{response_id}/cancel", responses=documented(400, 401, 404, 429, 503))
async def cancel_response(response_id: str, scope: ScopeDep, services: ServicesDep,
                          guard: GuardDep) -> JSONResponse:
    """As vLLM answers it: only a background response can be cancelled (none here)."""
    return JSONResponse(await services.openai.cancel_response(scope, response_id))


@router.post("/tokenize", response_model=TokenizeResponse,
             responses=documented(400, 401, 404, 413, 429, 503))
async def tokenize(body: TokenizeRequest, scope: ScopeDep, services: ServicesDep,
                   guard: GuardDep) -> JSONResponse:
    """A prompt's or a chat's token ids, as vLLM's server tokenizes them. Counted against the
    key's request rate, not its tokens."""
    guard.name(body.model)
    return JSONResponse(await services.openai.tokenize(scope, body))


@router.post("/detokenize", response_model=DetokenizeResponse,
             responses=documented(400, 401, 404, 413, 429, 503))
async def detokenize(body: DetokenizeRequest, scope: ScopeDep, services: ServicesDep,
                     guard: GuardDep) -> JSONResponse:
    """Token ids back to text. Counted against the key's request rate, not its tokens."""
    guard.name(body.model)
    return JSONResponse(await services.openai.detokenize(scope, body))


def _respond(answer: Answer) -> Response:
    headers = {TIER_HEADER: answer.tier}
    if isinstance(answer.result, dict):
        return JSONResponse(answer.result, headers=headers)
    return StreamingResponse(answer.result, media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache"})


@router.get("/v1/models", response_model=ModelList, responses=documented(401, 503))
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


@router.get("/health", responses=_PROBE)
@router.get("/health/ready", responses=_PROBE)
async def ready(services: ServicesDep) -> JSONResponse:
    """Readiness: send traffic here. False while draining or once the engine died."""
    if services.ready and not services.draining and services.openai.engine_alive():
        return JSONResponse({"status": "ok"})
    status = "draining" if services.draining else "unavailable"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/health/live", responses=_PROBE)
async def live(services: ServicesDep) -> JSONResponse:
    """Liveness: the event loop answers and the engine runs; never fails for being busy."""
    if services.openai.engine_alive():
        return JSONResponse({"status": "alive"})
    return JSONResponse({"status": "engine dead"}, status_code=503)


_NO_METRICS_HERE = ("Not Found: this gateway's metrics name every tenant's adapters; they are served "
                    "on the metrics port (--metrics-port), or here with the admin key")


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus text format. On the API port (no `metrics_port` set) only "
          "with the admin key: the metrics name every tenant's adapters.",
          "content": {CONTENT_TYPE_LATEST: {}}}, **documented(401, 404)})
async def metrics(request: Request, services: ServicesDep) -> Response:
    if services.settings.metrics_port is None:  # on the API port, where tenants call
        check_admin(request, services, missing=_NO_METRICS_HERE)
    m = services.metrics
    m.ready.set(1 if services.ready else 0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
