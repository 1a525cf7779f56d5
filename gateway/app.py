"""The gateway application: ``create_app(settings)`` with a lifespan that owns resources."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy.engine import make_url
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_registry import (
    LIMITS,
    ArtifactError,
    ConflictError,
    DatabaseError,
    IncompatibleAdapterError,
    LimitReachedError,
    NotFoundError,
    Registry,
    RegistryError,
    SourceError,
    TooLargeError,
    ValidationError,
)
from gateway.api.admin import is_upload_path
from gateway.api.admin import router as admin_router
from gateway.api.deps import Services
from gateway.api.fine_tuning import is_file_upload
from gateway.api.fine_tuning import router as fine_tuning_router
from gateway.api.middleware import METRICS_PATH, BodySizeLimit, MetricsPortSplit
from gateway.api.request import RequestEdge
from gateway.api.routes import router
from gateway.config import GatewaySettings
from gateway.engine import Engine
from gateway.engine.base import ServingOptions
from gateway.engine.serving import OpenAIService
from gateway.engine.shadow import ShadowRunner
from gateway.errors import GatewayError, error_body
from gateway.observability.ledger import UsageLedger
from gateway.observability.logs import Throttled
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.msp import ModelServerProtocol
from gateway.observability.tracing import SERVICE_NAME, Tracing, engine_traces_endpoint
from gateway.protection.admission import FairAdmission
from gateway.protection.admission_limit import LatencyTarget
from gateway.protection.fair_share import FairShare
from gateway.protection.quotas import Limits, LocalQuotaStore, Quotas, QuotaStore
from gateway.residency.disk_cache import DiskCache
from gateway.residency.manager import AdapterManager
from gateway.startup import keep_warming, open_registry, warm_up
from gateway.tenancy.directory import TenantDirectory
from gateway.tenancy.freshness import GenerationWatch
from gateway.tenancy.invalidation import start_listener
from gateway.tenancy.rollout_driver import RolloutDriver

logger = logging.getLogger(__name__)

EngineFactory = Callable[[GatewaySettings], Engine]


def vllm_engine_factory(settings: GatewaySettings) -> Engine:
    from gateway.engine.vllm import VllmEngine, VllmOptions  # imports vLLM: only when used

    if settings.cpu_kvcache_space_gib is not None:
        # vLLM reads this from the environment only; an operator's explicit value wins.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_space_gib))
    traces = engine_traces_endpoint(os.environ)
    if traces is not None:
        # vLLM's exporter reads only the traces-specific protocol variable (default grpc),
        # and names its service from the environment alone (else "unknown_service").
        os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", traces[1])
        os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)

    return VllmEngine.start(VllmOptions(
        model_dir=settings.base_model_dir, dtype=settings.dtype,
        max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
        max_loras=settings.max_loras, max_cpu_loras=settings.max_cpu_loras,
        max_lora_rank=settings.max_lora_rank, gpu_memory_utilization=settings.gpu_memory_utilization,
        scheduling_policy=settings.scheduling_policy,
        otlp_traces_endpoint=traces[0] if traces is not None else None,
    ))


def _terminate_process() -> None:
    # The supervisor (Kubernetes, systemd, the CLI) restarts a gateway whose engine died.
    os.kill(os.getpid(), signal.SIGTERM)


def quota_store(settings: GatewaySettings) -> QuotaStore:
    """Redis when configured (limits hold across replicas), else this process's own."""
    if settings.redis_url is None:
        logger.warning("quotas: no redis_url, so rate limits are per process: each replica "
                       "allows a tenant its full limit")
        return LocalQuotaStore()
    from gateway.protection.redis_quotas import RedisQuotaStore  # imports redis: only when configured

    # Tenant ids are per registry database: its address (less any password) names the keys.
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    prefix = f"lgw:quota:{hashlib.sha256(database.encode()).hexdigest()[:16]}"
    logger.info("quotas: in Redis, shared by every replica (keys %s:*)", prefix)
    return RedisQuotaStore(settings.redis_url.get_secret_value(), prefix=prefix)


def default_limits(settings: GatewaySettings) -> Limits:
    return Limits(**{spec.name: getattr(settings, f"default_{spec.name}") for spec in LIMITS})


TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize"})  # counted against the request rate
FINE_TUNING_PATHS = ("/v1/files", "/v1/fine_tuning/")  # tenants' data and jobs, not answers


def is_inference_path(path: str) -> bool:
    """The answers counted in lgw_requests_total: the inference API, not listings or probes."""
    if path == "/v1/models" or path.startswith(FINE_TUNING_PATHS):
        return False
    return path.startswith("/v1/") or path in TOKENIZER_PATHS


def create_app(settings: GatewaySettings, *, engine_factory: EngineFactory = vllm_engine_factory,
               on_engine_dead: Callable[[], None] | None = None,
               tracing: Tracing | None = None) -> FastAPI:
    """The app; ``tracing`` defaults to what the ``OTEL_*`` variables ask (off when unset)."""
    metrics = GatewayMetrics()
    tracing = Tracing.from_env() if tracing is None else tracing
    ledger = UsageLedger(settings.replica_name, settings.usage_flush_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry, contract = await open_registry(settings)
        try:
            started = time.perf_counter()
            engine = await asyncio.to_thread(engine_factory, settings)
            logger.info("inference engine started in %.1fs", time.perf_counter() - started)
        except BaseException:
            registry.close()
            raise
        try:
            # On the loop, not in a thread: vLLM's serving classes may bind to the running loop.
            serving = engine.openai(ServingOptions(
                settings.base_name, settings.base_model_dir, settings.tool_call_parser,
                settings.stored_responses))
        except BaseException:
            engine.shutdown()
            registry.close()
            raise
        services: Services

        def engine_died() -> None:
            services.ready = False
            if settings.exit_on_engine_death:
                (on_engine_dead or _terminate_process)()

        disk = await asyncio.to_thread(DiskCache, settings.cache_dir, settings.disk_cache_max_bytes)
        # One read of the registry's change counter keeps every cached key, resolution and
        # limit fresh (gateway.tenancy.freshness), instead of one lookup per entry in use.
        watch = GenerationWatch(registry.generation, settings.resolve_ttl_seconds)
        grace = settings.registry_outage_grace_seconds
        tenants = TenantDirectory(registry, served_base=(contract.model_id, contract.revision),
                                  ttl=settings.resolve_ttl_seconds, watch=watch, outage_grace=grace,
                                  base_name=settings.base_name if settings.expose_base else None)
        adapters = AdapterManager(registry, engine, disk, metrics,
                                  engine_capacity=settings.max_cpu_loras,
                                  slot_capacity=settings.max_loras,
                                  load_concurrency=settings.adapter_load_concurrency,
                                  slot_wait_s=settings.adapter_slot_wait_seconds)
        admin = Registry(registry.db, registry.store, actor="admin")
        quotas = Quotas(quota_store(settings), registry, default_limits(settings), metrics,
                        fail_open=settings.quota_failure_mode == "open",
                        ttl=settings.resolve_ttl_seconds, watch=watch, outage_grace=grace)
        # Fair: an eighth of the slots is kept for tenants with nothing in flight (see admission).
        reserve = settings.max_in_flight // 8 if settings.fair_scheduling else 0
        # The engine's priorities: a light tenant's request may pass as many waiting in the
        # engine as the gateway admits at once (gateway.protection.fair_share).
        share = (FairShare(slack=settings.max_in_flight)
                 if settings.scheduling_policy == "priority" else None)
        target = (None if settings.admission_tpot_target_ms is None else
                  LatencyTarget(settings.admission_tpot_target_ms / 1000, settings.max_in_flight,
                                floor=min(2, settings.max_in_flight)))
        admission = FairAdmission(settings.max_in_flight, fair=settings.fair_scheduling,
                                  reserve=reserve, share=share, latency_target=target,
                                  adapter_slots=settings.max_loras,
                                  max_queued_per_tenant=settings.queue_max_per_tenant,
                                  max_queued=settings.queue_max_total,
                                  deadline_s=settings.queue_deadline_seconds, metrics=metrics)
        # A rollout's shadow comparisons use spare capacity only: nobody waiting, a slot free.
        shadows = ShadowRunner(serving, adapters, ledger, metrics,
                               lambda: admission.queued() == 0 and admission.in_flight < admission.limit,
                               max_in_flight=settings.shadow_max_in_flight,
                               max_tokens=settings.shadow_max_tokens,
                               engine_priority=settings.scheduling_policy == "priority")
        openai = OpenAIService(engine, serving, tenants, adapters,
                               tools_supported=settings.tool_call_parser is not None,
                               metrics=metrics, on_engine_dead=engine_died,
                               stored_responses=settings.stored_responses,
                               refusal=settings.refusal, shadows=shadows)
        services = Services(settings, tenants, adapters, openai, metrics, admin, quotas, admission,
                            Registry(registry.db, registry.store, actor="tenant-api"))
        app.state.services = services
        services.warmup_errors, again = await warm_up(tenants, adapters, settings)
        warming = asyncio.create_task(keep_warming(tenants, adapters, again, services.warmup_errors),
                                      name="start-up pins, again")
        watch.start()
        ledger.start(registry)
        rollouts = RolloutDriver(registry.rollouts, ledger.writer, metrics,
                                 settings.rollout_decide_seconds)
        rollouts.start()
        app.state.rollouts = rollouts
        app.state.shadows = shadows
        app.state.registry_changes = start_listener(
            registry, tenants, quotas, metrics, enabled=settings.registry_changes_channel,
            ttl=settings.resolve_ttl_seconds, retry_s=settings.registry_changes_retry_seconds)
        logger.info("gateway ready: base %s, %d adapter slots in engine memory",
                    settings.base_model_id, settings.max_cpu_loras)
        msp = ModelServerProtocol(engine, adapters, admission, tenants, model_name=settings.base_name)
        metrics.registry.register(msp)
        # As vLLM's own server does: the start-up heap (the engine client, tokenizer,
        # configs: millions of objects) leaves the collector's view, so an oldest-generation
        # collection while serving does not walk it (pauses of a tenth of a second and more).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await rollouts.stop()
            await shadows.stop()
            await ledger.stop()
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            if app.state.registry_changes is not None:
                await app.state.registry_changes.stop()
            await watch.stop()
            metrics.registry.unregister(msp)
            await quotas.store.close()
            engine.shutdown()
            registry.close()
            tracing.shutdown()
            gc.unfreeze()  # what this app left behind can be collected again

    app = FastAPI(title="lora-gateway", version="0.1.0", lifespan=lifespan)
    app.include_router(router)
    app.include_router(fine_tuning_router)
    # Disabled, the admin routes answer 404 (see require_admin) and are not documented.
    app.include_router(admin_router, include_in_schema=settings.admin_api_key is not None)
    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]  # FastAPI's documented override
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes,
                       exempt=lambda path: is_upload_path(path) or is_file_upload(path))
    if settings.metrics_port is not None:
        app.add_middleware(MetricsPortSplit, metrics_port=settings.metrics_port)
    app.add_middleware(RequestEdge, metrics=metrics, counted=is_inference_path,
                       replica=settings.replica_name, ledger=ledger, tracing=tracing)
    app.state.ledger = ledger
    return app


def _openapi(app: FastAPI, settings: GatewaySettings) -> dict[str, Any]:
    """FastAPI's document, less what the gateway never answers on the API port.

    Validation errors are 400 in OpenAI's envelope (see ``_invalid``), never FastAPI's 422;
    the 422 it adds to every route with parameters goes, unless a route declares its own.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    if settings.metrics_port is not None:  # on its own port: 404 here
        doc["paths"].pop(METRICS_PATH, None)
    default_422 = {"$ref": "#/components/schemas/HTTPValidationError"}
    for operations in doc["paths"].values():
        for operation in operations.values():
            answer = operation["responses"].get("422", {})
            if answer.get("content", {}).get("application/json", {}).get("schema") == default_422:
                del operation["responses"]["422"]
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = doc
    return doc


def _install_error_handlers(app: FastAPI) -> None:
    """The one place exceptions become OpenAI's error envelope."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RegistryError)
    async def _registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        # Tenants' paths translate NotFound into model_not_found before this; what reaches
        # them here is a registry that is away (database or store): retry later.
        status, code = next(((s, c) for kind, s, c in _REGISTRY_STATUS if isinstance(exc, kind)),
                            (400, "invalid_request"))
        kind = "invalid_request_error" if status < 500 else "server_error"
        if isinstance(exc, LimitReachedError):
            return JSONResponse(error_body(str(exc), "requests", code), status_code=status,
                                headers={"Retry-After": str(math.ceil(exc.retry_after))})
        if status < 500:
            return JSONResponse(error_body(str(exc), kind, code), status_code=status)
        message = str(exc)
        if not request.url.path.startswith("/admin/"):
            # The database's or store's address is the operator's: tenants get what happened.
            _outages.log(logging.ERROR, code, "%s on %s: %s", code, request.url.path, exc)
            message = _TENANT_MESSAGES.get(code, "the gateway's registry is unavailable; retry shortly")
        return JSONResponse(error_body(message, kind, code), status_code=status,
                            headers={"Retry-After": str(REGISTRY_RETRY_AFTER_S)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        code = "invalid_value"
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {'.'.join(loc)}"
            code = "unknown_parameter"
        elif first.get("type") == "json_invalid":
            message = "The request body is not valid JSON."
            code = "invalid_json"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        body = error_body(message, "invalid_request_error", code, ".".join(loc) or None)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error")
        return JSONResponse(error_body(str(exc.detail), kind, code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(GatewayError("internal error; see the gateway log").body(), status_code=500)


REGISTRY_RETRY_AFTER_S = 1
_TENANT_MESSAGES = {
    "database_unavailable": "the gateway cannot reach its registry database right now; retry shortly",
    "artifact_unavailable": "the gateway cannot reach its artifact store right now; retry shortly",
}
_outages = Throttled(logger)

_REGISTRY_STATUS: tuple[tuple[type[RegistryError], int, str], ...] = (
    (NotFoundError, 404, "not_found"),
    (TooLargeError, 413, "payload_too_large"),
    (LimitReachedError, 429, "rate_limit_exceeded"),
    (ConflictError, 409, "conflict"),
    (ValidationError, 400, "invalid_value"),
    (SourceError, 400, "invalid_archive"),
    (IncompatibleAdapterError, 422, "incompatible_adapter"),
    (ArtifactError, 503, "artifact_unavailable"),
    (DatabaseError, 503, "database_unavailable"),
)
