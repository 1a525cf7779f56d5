"""A tenant's request passes its quotas, then waits its fair turn for the engine.

The wiring is three lines in a route::

    async def chat_completions(body: ..., scope: ScopeDep, services: ServicesDep,
                               guard: GuardDep) -> Response:
        body = guard.check(body)   # ceilings (400), default max_tokens, ``model`` parsed once
        await guard.admit()        # an engine slot, by weight (429/503 with Retry-After)
        answer = await guard.serve(services.openai.chat(scope, body))  # the service call

``GuardDep`` itself refuses new work while the gateway drains (503) and takes the quota
lease (429 over a limit). A client that disconnects while queued, or before its answer
starts, is let go: the service call is cancelled, which aborts its engine request (a
started stream is watched by the streaming response itself). Lease and slot are released
by the request's scope (``gateway.api.request``) once the answer is complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Protocol, TypeVar

from fastapi import Depends, Request

from adapters_registry import Tenant
from gateway.api.deps import ServicesDep, TenantDep
from gateway.api.request import RequestScope, ScopeDep
from gateway.errors import ClientGoneError, InvalidRequestError, OverloadedError
from gateway.protection.usage import Copyable, UsageMeter, apply_ceilings


class _Body(Copyable, Protocol):
    @property
    def model(self) -> str | None: ...


B = TypeVar("B", bound=_Body)
T = TypeVar("T")


class Guard:
    def __init__(self, services: ServicesDep, tenant: Tenant, request: Request,
                 scope: RequestScope, meter: UsageMeter) -> None:
        self._services = services
        self._tenant = tenant
        self._request = request
        self._scope = scope
        self.meter = meter

    def check(self, body: B) -> B:
        """The tenant's ceilings on the body, and its ``model`` parsed into the scope."""
        body = apply_ceilings(body, self.meter.limits)
        self.name(body.model)
        return body

    def name(self, model: str | None) -> None:
        """``model`` parsed into the scope; absent (where a body may leave it out, as
        vLLM's tokenizer endpoints do): the base, where this gateway serves it."""
        if model is None:
            model = self._services.settings.base_name if self._services.settings.expose_base else None
            if model is None:
                raise InvalidRequestError("model is required: name one of your adapters",
                                          param="model")
        self._scope.model = parsed = self._services.tenants.parse(self._tenant, model)
        if parsed.ref is None:
            self._scope.label = parsed.text  # the bare base

    async def admit(self) -> None:
        """Wait for an engine slot, held until the answer is complete."""
        model = self._scope.model
        adapter = None if model is None or model.ref is None else f"{self._tenant.name}/{model.text}"
        try:
            with self._scope.trace.stage("admission"):
                slot = await self._services.admission.acquire(
                    self._tenant.name, self.meter.limits.weight, self._request.is_disconnected,
                    adapter)
        except ClientGoneError:
            raise self._client_gone("while waiting") from None
        self._scope.slot = slot
        self._scope.on_close(slot.release)

    async def serve(self, call: Awaitable[T]) -> T:
        """``call``'s result, unless the client disconnects first: then ``call`` is cancelled
        (vLLM aborts the engine request) and the answer, to nobody, is counted as aborted."""
        work = asyncio.ensure_future(call)
        gone = asyncio.ensure_future(_disconnect(self._request))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled itself
            gone.cancel()
            if not work.done():
                work.cancel()
                await asyncio.wait((work,))  # its clean-up (engine abort, adapter lease) ran
        if work.cancelled() or (gone.done() and not gone.cancelled()
                                and work.exception() is not None):
            raise self._client_gone("before the answer was complete")
        return work.result()  # a result that raced the disconnect is still the answer

    def _client_gone(self, when: str) -> OverloadedError:
        self._scope.aborted = True
        return OverloadedError(f"the client disconnected {when}")  # sent to nobody


async def guard(request: Request, scope: ScopeDep, tenant: TenantDep,
                services: ServicesDep) -> Guard:
    if services.draining:
        raise OverloadedError("this gateway is shutting down and takes no new requests; "
                              "retry (another replica will answer)", retry_after=1)
    with scope.trace.stage("quota"):
        meter = await UsageMeter.open(services.quotas, tenant)
        scope.usage = meter  # before admit: a 429 carries the x-ratelimit headers too
        scope.on_close(meter.close)
        await meter.admit()
    return Guard(services, tenant, request, scope, meter)


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects. The body was read already (the route parsed it),
    so the only message left to receive is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


GuardDep = Annotated[Guard, Depends(guard)]
