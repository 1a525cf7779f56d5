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
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from adapters_registry import AdapterVersion, Shadow
from gateway.api.request import RequestScope
from gateway.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from gateway.engine import Engine, LoraSpec
from gateway.engine.base import Meter, OpenAIServing, Route, ServingResult
from gateway.engine.shadow import ShadowRunner
from gateway.errors import (
    EngineDeadError,
    EngineUnavailableError,
    GatewayError,
    InvalidRequestError,
    OverloadedError,
    ResponseNotFoundError,
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
    # The last events of a stream that fails after its first: the error, as the API frames it.
    error_events: Callable[[dict[str, Any], int], list[str]]


class OpenAIService:
    def __init__(self, engine: Engine, serving: OpenAIServing, tenants: TenantDirectory,
                 adapters: AdapterManager, *, tools_supported: bool, metrics: GatewayMetrics,
                 on_engine_dead: Callable[[], None], stored_responses: int = 0,
                 refusal: re.Pattern[str] | None = None,
                 shadows: ShadowRunner | None = None) -> None:
        self._engine = engine
        self._refusal = refusal  # what an answer that refuses opens with (rollout evidence)
        self._shadows = shadows
        self._stored = StoredResponses(stored_responses, serving.forget_response)
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
        return await self._serve(scope, req, self._serving.chat, kind="chat")

    async def completion(self, scope: RequestScope, req: CompletionRequest) -> Answer:
        """``/v1/completions``."""
        return await self._serve(scope, req, self._serving.completion, kind="completion")

    async def responses(self, scope: RequestScope, req: ResponsesRequest) -> Answer:
        """``/v1/responses``. A stored response is its tenant's alone: retrieving it, or
        continuing from it (``previous_response_id``), as another tenant is a 404."""
        if req.tools and not self._tools_supported:
            raise InvalidRequestError(
                "this model's chat template does not support tools (no tool call parser is "
                "configured for its base)", param="tools")
        tenant = scope.tenant
        assert tenant is not None, "the guard identified the caller"
        if req.previous_response_id is not None:
            self._stored.check(tenant.id, req.previous_response_id)
        return await self._serve(scope, req, self._serving.responses, kind="responses")

    async def retrieve_response(self, scope: RequestScope, response_id: str) -> dict[str, Any]:
        """``GET /v1/responses/{id}``: the caller's own stored response."""
        assert scope.tenant is not None, "the guard identified the caller"
        self._stored.check(scope.tenant.id, response_id)
        return await self._serving.retrieve_response(response_id)

    async def cancel_response(self, scope: RequestScope, response_id: str) -> dict[str, Any]:
        """``POST /v1/responses/{id}/cancel``, as vLLM answers it (only background responses,
        which this gateway does not serve, can be cancelled)."""
        assert scope.tenant is not None, "the guard identified the caller"
        self._stored.check(scope.tenant.id, response_id)
        return await self._serving.cancel_response(response_id)

    async def tokenize(self, scope: RequestScope,
                       req: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        """``/tokenize``: no engine request and no tokens charged."""
        return await self._serving.tokenize(req, await self._named(scope))

    async def detokenize(self, scope: RequestScope, req: DetokenizeRequest) -> dict[str, Any]:
        """``/detokenize``: no engine request and no tokens charged."""
        return await self._serving.detokenize(req, await self._named(scope))

    async def _named(self, scope: RequestScope) -> Route:
        """A route for a call that reads only the base's tokenizer, which every adapter of a
        base shares (vLLM serves adapters with the base's tokenizer); the name must still
        be one of the caller's (404 otherwise), so nothing else is learned from it."""
        tenant, model = scope.tenant, scope.model
        assert tenant is not None and model is not None, "the route parsed the request first"
        if model.ref is not None:
            with scope.trace.stage("resolve"):
                scope.version = version = await self._tenants.resolve(tenant, model)
            scope.label = f"{version.tenant}/{version.adapter}"
        return Route(model.text, None, Meter(), uuid.uuid4().hex)

    async def _pick(self, scope: RequestScope,
                    caller: str | None) -> tuple[AdapterVersion | None, Shadow | None]:
        """The version that serves this request: the one the caller's adapter name stands for
        now (an alias moves), or, for an alias with a weighted split, the caller's share of
        it (None: the split sent it to the bare base); and its rollout's shadow, if any."""
        tenant, model = scope.tenant, scope.model
        assert tenant is not None and model is not None and model.ref is not None, "parsed first"
        with scope.trace.stage("resolve") as span:
            scope.version, scope.variant, shadow = await self._tenants.pick(tenant, model, caller)
            span.set_attribute("lgw.adapter.variant", scope.variant)
        scope.label = f"{tenant.name}/{model.ref.name}"
        return scope.version, shadow

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
                     serve: Callable[[Any, Route], Awaitable[ServingResult]],
                     kind: str) -> Answer:
        if not self.engine_alive():
            raise EngineUnavailableError("the inference engine is not running")
        tenant, model = scope.tenant, scope.model
        assert tenant is not None and model is not None, "the guard parsed the request first"
        caller = getattr(req, "user", None) or scope.session  # a split's sticky key
        version, shadow = (None, None) if model.ref is None else await self._pick(scope, caller)
        start_shadow = None  # copied before the engine's fields are set; started once accepted
        if shadow is not None and self._shadows is not None:
            start_shadow = self._shadows.prepare(tenant, kind, req, shadow)
        responses = kind == "responses"
        request_id = uuid.uuid4().hex
        if responses:
            request_id = f"resp_{request_id}"  # the Responses API's id is the request id itself
            if req.store and self._stored.capacity:
                self._stored.add(tenant.id, request_id)  # before vLLM can store it
        req.request_id = request_id  # the response id derives from it; never the caller's
        # Prefix-cache entries are per tenant: no cross-tenant timing side channel.
        req.cache_salt = f"tenant-{tenant.id}"
        stack = AsyncExitStack()
        try:
            with scope.trace.stage("adapter.acquire") as span:
                lora, tier = await self._acquire(version, stack)
                span.set_attribute("lgw.adapter.tier", tier)
        except BaseException:
            await stack.aclose()
            raise
        scope.log.bind(adapter_version=version.ref if version else scope.variant, adapter_tier=tier)
        meter = _meter(scope)
        if scope.slot is not None and scope.slot.priority is not None:
            req.priority = scope.slot.priority  # its tenant's fair share (gateway.protection.fair_share)
        route = Route(model.text, lora, meter, request_id, scope.trace.engine_headers())
        call = _Call(scope, route, time.perf_counter(), tier,
                     _response_error_events if responses else _chat_error_events)
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
        if start_shadow is not None:
            start_shadow()  # the caller's request was accepted: its quotas passed
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
        sent = 0
        async with stack:
            try:
                if first is not None:
                    self._refuse_if_cut()
                    yield first
                    sent = 1
                async for line in events:
                    self._refuse_if_cut()
                    yield line
                    sent += 1
                status = "200"
            except Exception as exc:
                error = self._error(call, exc)
                status = _status(error)
                call.scope.stream_error_status = status  # counted as the error, not the 200 sent
                # Headers are gone: the error travels as the last event.
                body = error.body() if isinstance(error, GatewayError) else {}
                for event in call.error_events(body, sent):
                    yield event
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
        scope = call.scope
        if meter.first_token_at is not None:
            scope.ttft_s = meter.first_token_at - call.started
            m.ttft.labels(*labels).observe(scope.ttft_s)
        if status == "200":
            m.e2e.labels(*labels).observe(e2e)
            scope.latency_s = e2e
            scope.refused = self._refusal is not None and bool(self._refusal.match(meter.head))
        prompt, completion = meter.total_prompt_tokens, meter.total_completion_tokens
        call.scope.prompt_tokens, call.scope.completion_tokens = prompt, completion
        m.prompt_tokens.labels(*labels).inc(prompt)
        m.completion_tokens.labels(*labels).inc(completion)
        call.scope.trace.engine_done(meter.first_token_at, **{
            "gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": completion})
        # One access record per request: which tier served its adapter, and how fast.
        logger.info("served model=%s status=%s adapter_tier=%s prompt_tokens=%d "
                    "completion_tokens=%d latency_ms=%.1f", call.scope.label, status, call.tier,
                    prompt, completion, e2e * 1000,
                    extra={"status": status, "prompt_tokens": prompt,
                           "completion_tokens": completion})


def _chat_error_events(body: dict[str, Any], sent: int) -> list[str]:
    """Chat and completions: the error envelope as a last data event, then ``[DONE]``."""
    return [f"data: {json.dumps(body, separators=(',', ':'))}\n\n", _DONE]


def _response_error_events(body: dict[str, Any], sent: int) -> list[str]:
    """Responses: OpenAI's ``error`` event, numbered after the events sent (vLLM numbers
    its events from 0, one per event); the Responses stream has no ``[DONE]``."""
    error = body.get("error", {})
    event = {"type": "error", "code": error.get("code"), "message": error.get("message", ""),
             "param": error.get("param"), "sequence_number": sent}
    return [f"event: error\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"]


class StoredResponses:
    """Which tenant each stored response belongs to, for the newest ``capacity`` of them.

    vLLM's serving class stores responses in one process-wide dict and never forgets them;
    the gateway names each response's owner before vLLM stores it, answers another tenant's
    id exactly as a missing one, and makes vLLM forget the oldest past ``capacity``.
    """

    def __init__(self, capacity: int, forget: Callable[[str], None]) -> None:
        self.capacity = capacity
        self._forget = forget
        self._owners: OrderedDict[str, int] = OrderedDict()

    def add(self, tenant_id: int, response_id: str) -> None:
        self._owners[response_id] = tenant_id
        while len(self._owners) > self.capacity:
            oldest, _ = self._owners.popitem(last=False)
            self._forget(oldest)

    def check(self, tenant_id: int, response_id: str) -> None:
        if self._owners.get(response_id) != tenant_id:
            raise ResponseNotFoundError.of(response_id)


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
