"""A tenant's request passes its quotas, then waits its fair turn for the engine.

The wiring is three lines in a route::

    async def chat_completions(body: ..., tenant: TenantDep, services: ServicesDep,
                               guard: GuardDep) -> Response:
        body = guard.check(body)   # the tenant's max_tokens ceiling (400), default max_tokens
        await guard.admit()        # an engine slot, by weight (429/503 with Retry-After)
        ...                        # the service call, unchanged

``GuardDep`` itself takes the quota lease (429 over a limit). Lease and slot are released
by ``gateway.accounting`` once the answer is complete; the service charges tokens through
``gateway.usage.charge_prompt`` / ``charge_completion``.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Request

from adapters_registry.records import Tenant
from gateway.accounting import Ticket, current_ticket
from gateway.api.deps import ServicesDep, TenantDep
from gateway.config import GatewaySettings
from gateway.errors import ClientGoneError, OverloadedError
from gateway.usage import UsageMeter, apply_ceilings

B = TypeVar("B")


class Guard:
    def __init__(self, services: ServicesDep, tenant: Tenant, request: Request, ticket: Ticket,
                 meter: UsageMeter) -> None:
        self._services = services
        self._tenant = tenant
        self._request = request
        self._ticket = ticket
        self.meter = meter

    def check(self, body: B) -> B:
        """The tenant's ceilings on the body; a request for the bare base is labelled as such."""
        settings: GatewaySettings = self._services.settings
        if getattr(body, "model", None) == settings.base_name:
            self._ticket.adapter = settings.base_name
        return apply_ceilings(body, self.meter.limits)

    async def admit(self) -> None:
        """Wait for an engine slot, held until the answer is complete."""
        try:
            slot = await self._services.admission.acquire(
                self._tenant.name, self.meter.limits.weight, self._request.is_disconnected)
        except ClientGoneError:
            self._ticket.aborted = True
            raise OverloadedError("the client disconnected while waiting") from None
        self._ticket.on_close(slot.release)


async def guard(request: Request, tenant: TenantDep, services: ServicesDep) -> Guard:
    ticket = current_ticket.get()
    assert ticket is not None, "gateway.accounting.RequestAccounting must serve this route"
    ticket.tenant = tenant.name
    meter = await UsageMeter.open(services.quotas, tenant)
    ticket.meter = meter  # before admit: a 429 carries the x-ratelimit headers too
    ticket.on_close(meter.close)
    await meter.admit()
    return Guard(services, tenant, request, ticket, meter)


GuardDep = Annotated[Guard, Depends(guard)]
