"""The OpenAI endpoints for tenants: one service method per endpoint.

Each method takes the request's scope (``gateway.api.request``: tenant, parsed ``model``, quota
meter), resolves the adapter version, holds the adapter (accepted by the engine) until the
answer is complete, and hands the request to the engine's OpenAI layer (vLLM's own serving
classes, ``gateway.engine.openai``). It returns a finished body or an SSE iterator; errors
before the first byte are raised, errors after it end the stream with an error event and
``[DONE]``. Every prompt's and every choice's tokens are counted into the engine seam's
``Meter``, which charges them to the scope's quota meter as they come.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from adapters_registry import AdapterVersion
from gateway.api.request import RequestScope
from gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from gateway.engine import Engine, LoraSpec
from gateway.engine.base import Meter, OpenAIServing, Route, ServingResult
from gateway.errors import (
    EngineDeadError,
    EngineUnavailableError,
    GatewayError,
    InvalidRequestError,
    OverloadedError,
)
from gateway.observability.metrics import GatewayMetrics
from gateway.residency.manager import AdapterManager
from gateway.tenancy.directory import TenantDirectory

logger = logging.getLogger(__name__)
_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Answer:
    """A finished body (JSON-ready) or the SSE lines of a stream, and the adapter's tier."""

    result: dict[str, Any] | AsyncIterator[str]
    tier: str


@dataclass
class _Call:
    scope: RequestScope
    route: Route
    started: float  # when the service took the request (after admission)
    tier: str


class OpenAIService:
    def __init__(self, engine: Engine, serving: OpenAIServing, tenants: TenantDirectory,
                 adapters: AdapterManager, *, tools_supported: bool, metrics: GatewayMetrics,
                 on_engine_dead: Callable[[], None]) -> None:
        self._engine = engine
        self._serving = serving
        self._tenants = tenants
        self._adapters = adapters
        self._tools_supported = tools_supported
        self._metrics = metrics
        self._on_engine_dead = on_engine_dead
        self._cutting_streams = False

    async def chat(self, scope: RequestScope, req: ChatCompletionRequest) -> Answer:
        """``/v1/chat/completions``."""
        if req.tools is not None and not self._tools_supported:
            raise InvalidRequestError(
                "this model's chat template does not support tools (no tool call parser is "
                "configured for its base)", param="tools")
        return await self._serve(scope, req, self._serving.chat)

    async def completion(self, scope: RequestScope, req: CompletionRequest) -> Answer:
        """``/v1/completions``."""
        return await self._serve(scope, req, self._serving.completion)

    def cut_streams(self) -> None:
        """End every stream at its next event with an error event and ``[DONE]``: the
        gateway stops and the drain grace is over (rather than a dropped connection)."""
        self._cutting_streams = True

    def engine_alive(self) -> bool:
        """False once the engine died; noticing it here also triggers the restart."""
        if self._engine.is_dead:
            self._on_engine_dead()
            return False
        return True

    async def _serve(self, scope: RequestScope, req: Any,
                     serve: Callable[[Any, Route], Awaitable[ServingResult]]) -> Answer:
        if not self.engine_alive():
            raise EngineUnavailableError("the inference engine is not running")
        tenant, model = scope.tenant, scope.model
        assert tenant is not None and model is not None, "the guard parsed the request first"
        version: AdapterVersion | None = None
        if model.ref is not None:
            scope.version = version = await self._tenants.resolve(tenant, model)
            scope.label = f"{version.tenant}/{version.adapter}"
        request_id = uuid.uuid4().hex
        req.request_id = request_id  # the response id derives from it; never the caller's
        # Prefix-cache entries are per tenant: no cross-tenant timing side channel.
        req.cache_salt = f"tenant-{tenant.id}"
        stack = AsyncExitStack()
        try:
            lora, tier = await self._acquire(version, stack)
        except BaseException:
            await stack.aclose()
            raise
        scope.log.bind(adapter_version=version.ref if version else None, adapter_tier=tier)
        meter = _meter(scope)
        if scope.slot is not None and scope.slot.priority is not None:
            req.priority = scope.slot.priority  # its tenant's fair share (gateway.protection.fair_share)
        call = _Call(scope, Route(model.text, lora, meter, request_id), time.perf_counter(), tier)
        self._metrics.in_flight.inc()
        first: str | None = None
        try:
            result = await serve(req, call.route)
            if not isinstance(result, dict):
                # The first event comes with the first engine output, after the prompt
                # passed its quota checks: a refusal is still a plain HTTP error, sent
                # before any header.
                first = await anext(result, None)
        except BaseException as exc:
            await stack.aclose()
            error = self._error(call, exc)
            self._finished(call, _status(error))
            if error is exc:
                raise
            raise error from None
        if isinstance(result, dict):
            await stack.aclose()
            self._finished(call, "200")
            return Answer(result, tier)
        return Answer(self._stream(call, first, result, stack), tier)

    async def _stream(self, call: _Call, first: str | None, events: AsyncIterator[str],
                      stack: AsyncExitStack) -> AsyncIterator[str]:
        """``first``, then the engine's other events; the adapter stays held until the last
        one is sent. (One generator per token between the engine and the socket, no more.)"""
        status = "499"  # unless it ends: the client went away
        async with stack:
            try:
                if first is not None:
                    self._refuse_if_cut()
                    yield first
                async for line in events:
                    self._refuse_if_cut()
                    yield line
                status = "200"
            except Exception as exc:
                error = self._error(call, exc)
                status = _status(error)
                call.scope.stream_error_status = status  # counted as the error, not the 200 sent
                # Headers are gone: the error travels as the last event, then [DONE].
                body = error.body() if isinstance(error, GatewayError) else {}
                yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
                yield _DONE
            finally:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()  # stops the engine's work for a client that left
                self._finished(call, status)

    def _refuse_if_cut(self) -> None:
        if self._cutting_streams:
            raise OverloadedError("the gateway stopped before this answer was complete (its "
                                  "drain grace was over); retry")

    async def _acquire(self, version: AdapterVersion | None,
                       stack: AsyncExitStack) -> tuple[LoraSpec | None, str]:
        if version is None:
            return None, "base"
        try:
            acquired = await stack.enter_async_context(self._adapters.use(version))
        except EngineDeadError:
            logger.critical("inference engine died while loading %s", version.ref)
            self._on_engine_dead()
            raise EngineUnavailableError("the inference engine stopped; retry shortly") from None
        return acquired.lora, acquired.tier

    def _error(self, call: _Call, exc: BaseException) -> BaseException:
        """What to answer ``exc`` with; a cancellation stays itself."""
        if isinstance(exc, EngineDeadError) or self._engine.is_dead:
            logger.critical("inference engine died during %s", call.route.request_id)
            self._on_engine_dead()
            return EngineUnavailableError("the inference engine stopped; retry shortly")
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, Exception):
            logger.error("request %s failed", call.route.request_id, exc_info=exc)
            return GatewayError("internal error; see the gateway log")
        return exc

    def _finished(self, call: _Call, status: str) -> None:
        m = self._metrics
        tenant = call.scope.tenant
        labels = (tenant.name if tenant is not None else "-", call.scope.label)
        m.in_flight.dec()  # (answers are counted by status in gateway.accounting, once)
        meter = call.route.meter
        e2e = time.perf_counter() - call.started
        if meter.first_token_at is not None:
            m.ttft.labels(*labels).observe(meter.first_token_at - call.started)
        if status == "200":
            m.e2e.labels(*labels).observe(e2e)
        prompt, completion = meter.total_prompt_tokens, meter.total_completion_tokens
        m.prompt_tokens.labels(*labels).inc(prompt)
        m.completion_tokens.labels(*labels).inc(completion)
        # One access record per request: which tier served its adapter, and how fast.
        logger.info("served model=%s status=%s adapter_tier=%s prompt_tokens=%d "
                    "completion_tokens=%d latency_ms=%.1f", call.scope.label, status, call.tier,
                    prompt, completion, e2e * 1000,
                    extra={"status": status, "prompt_tokens": prompt,
                           "completion_tokens": completion})


def _meter(scope: RequestScope) -> Meter:
    """The engine seam's token meter, charging the tenant's quotas and its fair share."""
    usage, slot = scope.usage, scope.slot
    if slot is None:
        return Meter() if usage is None else Meter(on_prompt=usage.prompt,
                                                   on_completion=usage.completion)
    charge, generated = slot.charge, slot.generated
    if usage is None:
        async def prompt_charged(tokens: int) -> None:
            charge(tokens)

        return Meter(on_prompt=prompt_charged, on_completion=generated)
    quota_prompt, quota_completion = usage.prompt, usage.completion

    async def prompt(tokens: int) -> None:
        await quota_prompt(tokens)  # a refused prompt never reaches the engine: not charged
        charge(tokens)

    def completion(tokens: int) -> None:
        quota_completion(tokens)
        generated(tokens)

    return Meter(on_prompt=prompt, on_completion=completion)


def _status(error: BaseException) -> str:
    return str(error.status) if isinstance(error, GatewayError) else "499"
