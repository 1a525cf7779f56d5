"""One request's state, from the edge to the engine seam, and the edge that makes it.

``RequestEdge`` (a pure ASGI middleware, outermost) gives every request a ``RequestScope``
and puts it in the ASGI scope, where the ``ScopeDep`` dependency hands it to the route;
from there it is passed as an argument (guard, service, engine seam). What the edge does
with it once the answer is complete:

- echoes ``x-request-id`` (the caller's if sane, else a new one) and the replica's name;
- names the adapter version that served (``x-lora-gateway-adapter-version``: ``acme/bot@v3``,
  or ``base`` where an alias's split sent the caller to the bare base);
- adds the quota meter's ``x-ratelimit-*`` headers to an inference answer;
- runs the request's releases (its quota lease, its engine slot) however it ended;
- counts an inference answer in ``lgw_requests_total`` by status: every status, and
  ``aborted`` when the client left before the answer was complete;
- opens an inference request's trace (``gateway.observability.tracing``; ``NO_TRACE`` while
  tracing is off) and ends it with the answer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

import anyio
from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_registry import AdapterVersion, Tenant
from gateway.observability.ledger import UsageLedger
from gateway.observability.logs import RequestLog, enter, leave
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.tracing import NO_TRACE, RequestTrace, Tracing
from gateway.protection.admission import Slot
from gateway.protection.usage import UsageMeter
from gateway.tenancy.directory import RequestedModel
from gateway.tenancy.splits import MAX_CALLER_CHARS, SESSION_HEADER

logger = logging.getLogger(__name__)
ABORTED = "aborted"
REQUEST_ID_HEADER = "x-request-id"
REPLICA_HEADER = "x-lora-gateway-replica"
VERSION_HEADER = "x-lora-gateway-adapter-version"
_KEY = "lgw.request"  # where the edge leaves the scope in the ASGI scope


@dataclass(eq=False)
class RequestScope:
    """Everything the gateway knows and holds for one request, filled in as it goes."""

    log: RequestLog  # request id, tenant, and the fields every log line carries
    arrived: float = field(default_factory=time.perf_counter)
    tenant: Tenant | None = None
    model: RequestedModel | None = None  # the body's ``model``, parsed once
    version: AdapterVersion | None = None  # what it resolved to (None: the bare base)
    variant: str | None = None  # an adapter request's version label, "v3" (or "base": a split's)
    session: str | None = None  # the x-lora-gateway-session header: a split's sticky key
    label: str = "-"  # the ``adapter`` metric label: tenant/adapter, or the base's name
    usage: UsageMeter | None = None  # the tenant's quota lease and token meter
    slot: Slot | None = None  # its engine slot: fair-share charges, the engine priority
    aborted: bool = False  # the client left (while queued, or mid-answer)
    # An error after the headers went out (a final SSE error event): the status it stands for.
    stream_error_status: str | None = None
    prompt_tokens: int = 0  # what the engine counted, once it answered
    completion_tokens: int = 0
    ttft_s: float | None = None  # from the service taking it to the first generated token
    latency_s: float | None = None  # a whole answer's (status 200)
    refused: bool = False  # a whole answer opening as the gateway's refusal pattern says
    trace: RequestTrace = NO_TRACE  # its spans (an inference request, while tracing is on)
    _on_close: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.log.request_id

    def identify(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.log.tenant = tenant.name

    def on_close(self, release: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``release`` once the answer is complete, sent or not (last registered, first run)."""
        self._on_close.append(release)

    async def close(self) -> None:
        while self._on_close:
            release = self._on_close.pop()
            try:
                result = release()
                if result is not None:
                    await result
            except Exception:
                logger.exception("releasing a request's resources failed")


async def request_scope(request: Request) -> RequestScope:
    scope: RequestScope = request.scope[_KEY]
    return scope


ScopeDep = Annotated[RequestScope, Depends(request_scope)]


class RequestEdge:
    """Makes each request's scope; on ``counted`` paths also meters and counts the answer."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, counted: Callable[[str], bool],
                 replica: str | None = None, ledger: UsageLedger | None = None,
                 tracing: Tracing | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.ledger = ledger
        self.tracing = tracing or Tracing()
        self.counted = counted
        self._replica = [(REPLICA_HEADER.encode(), replica.encode())] if replica else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        given = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if 0 < len(given) <= 64 and given.isprintable() else uuid.uuid4().hex
        req = scope[_KEY] = RequestScope(RequestLog(rid))
        session = headers.get(SESSION_HEADER.encode(), b"").decode("latin-1")
        if 0 < len(session) <= MAX_CALLER_CHARS and session.isprintable():
            req.session = session
        counted = self.counted(scope["path"])
        if counted and self.tracing.enabled:
            req.trace = self.tracing.begin(scope["method"], scope["path"], scope.get("headers", []))
            req.log.bind(trace_id=req.trace.trace_id)
        status: int | None = None
        complete = False

        async def edge_send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode()))
                headers.extend(self._replica)
                if counted and req.usage is not None:
                    headers.extend((k.encode(), v.encode()) for k, v in req.usage.headers.items())
                if req.variant is not None:
                    served = req.version.ref if req.version is not None else req.variant
                    headers.append((VERSION_HEADER.encode(), served.encode()))
                req.log.bind(status=str(status))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            try:
                await send(message)
            except OSError:
                req.aborted = True
                raise

        token = enter(req.log)
        try:
            await self.app(scope, receive, edge_send)
        finally:
            with anyio.CancelScope(shield=True):
                await req.close()
            leave(token)
            if counted:
                self._count(req, status, complete)

    def _count(self, req: RequestScope, status: int | None, complete: bool) -> None:
        if status is not None and not complete:
            req.aborted = True  # headers went out, the body did not finish
        # No answer at all: an unhandled error, answered 500 by the server outside us.
        label = ABORTED if req.aborted else req.stream_error_status or str(status or 500)
        tenant = req.tenant.name if req.tenant is not None else "-"
        self.metrics.requests.labels(tenant, req.label, label).inc()
        if req.variant is not None:
            self.metrics.version_requests.labels(tenant, req.label, req.variant, label).inc()
        if req.trace.enabled:
            req.trace.set(**{"lgw.tenant": tenant, "lgw.model": req.label,
                             "lgw.adapter.version": req.version.ref if req.version else None,
                             "lgw.adapter.tier": req.log.fields.get("adapter_tier"),
                             "lgw.request_id": req.request_id,
                             "gen_ai.usage.input_tokens": req.prompt_tokens,
                             "gen_ai.usage.output_tokens": req.completion_tokens})
            req.trace.finish(status, label)
        if self.ledger is not None and req.tenant is not None:
            # The version that served (an alias names several over time), else the base:
            # its own name, or ``acme/bot@base`` where acme/bot's split sent the caller to it.
            model = (req.version.ref if req.version is not None else
                     f"{req.label}@base" if req.variant == "base" else req.label)
            self.ledger.record(tenant, model, label, prompt_tokens=req.prompt_tokens,
                               completion_tokens=req.completion_tokens, ttft_s=req.ttft_s,
                               latency_s=None if req.aborted else req.latency_s,
                               refused=req.refused and not req.aborted)
