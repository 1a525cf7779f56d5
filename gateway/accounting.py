"""Every inference answer, accounted for in one place (a pure ASGI middleware).

Each request to the inference API gets a ``Ticket`` (a context variable) that the code
serving it fills in: the tenant and adapter for the metric's labels, the quota meter
whose ``x-ratelimit-*`` headers go on the answer, and what to release once the answer is
complete (the tenant's quota lease, its engine slot). The middleware then counts the answer
in ``lgw_requests_total`` by status: every status, and ``aborted`` when the client left
before the answer was complete. Releases run however the request ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import GatewayMetrics

if TYPE_CHECKING:
    from gateway.usage import UsageMeter

logger = logging.getLogger(__name__)
ABORTED = "aborted"


@dataclass
class Ticket:
    """One inference request, as the accounting sees it."""

    tenant: str = "-"
    adapter: str = "-"
    meter: UsageMeter | None = None
    aborted: bool = False  # the client left (while queued, or mid-answer)
    # An error after the headers went out (a final SSE error event): the status it stands for.
    stream_error_status: str | None = None
    _on_close: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)

    def on_close(self, release: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``release`` once the answer is complete, sent or not (last registered, first run)."""
        self._on_close.append(release)

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.meter is None:
            return []
        return [(k.encode(), v.encode()) for k, v in self.meter.headers.items()]

    async def close(self) -> None:
        while self._on_close:
            release = self._on_close.pop()
            try:
                result = release()
                if result is not None:
                    await result
            except Exception:
                logger.exception("releasing a request's resources failed")


current_ticket: ContextVar[Ticket | None] = ContextVar("ticket", default=None)


def note_adapter(label: str) -> None:
    """The adapter that serves the current request, for its metric labels."""
    ticket = current_ticket.get()
    if ticket is not None:
        ticket.adapter = label


class RequestAccounting:
    """Counts every answer on ``counted`` paths by status; adds the quota headers; releases."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, counted: Callable[[str], bool]) -> None:
        self.app = app
        self.metrics = metrics
        self.counted = counted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.counted(scope["path"]):
            await self.app(scope, receive, send)
            return
        ticket = Ticket()
        token = current_ticket.set(ticket)
        status: int | None = None
        complete = False

        async def accounted(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).extend(ticket.headers())
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            try:
                await send(message)
            except OSError:
                ticket.aborted = True
                raise

        try:
            await self.app(scope, receive, accounted)
        finally:
            current_ticket.reset(token)
            with anyio.CancelScope(shield=True):
                await ticket.close()
            if status is not None and not complete:
                ticket.aborted = True  # headers went out, the body did not finish
            # No answer at all: an unhandled error, answered 500 by the server outside us.
            label = (ABORTED if ticket.aborted
                     else ticket.stream_error_status or str(status or 500))
            self.metrics.requests.labels(ticket.tenant, ticket.adapter, label).inc()
