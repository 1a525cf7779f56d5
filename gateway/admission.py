"""Fair admission in front of the engine: at most ``capacity`` requests generate at once.

The others wait in one queue per tenant, served by weight with start-time fair queuing
(virtual time): each tenant's next request gets the start tag ``max(its last finish, V)``
and its finish is that plus ``1 / weight``; a free slot goes to the smallest start tag
(ties: the earlier arrival), and ``V`` moves to it. A tenant that was idle starts at ``V``,
so it banks no credit for idling but never waits behind another tenant's backlog: a tenant
with 100 queued and one with 1 alternate. ``fair=False`` serves in arrival order (FIFO).

Slots cannot be taken back from a request that generates, so a tenant flooding an idle
engine would hold every slot and the next tenant would wait for one to finish. ``reserve``
slots are therefore kept for tenants with nothing in flight, while more than one tenant
has been active in the last ``reserve_window_s``: a quiet tenant's request starts at once.
A tenant alone on the engine gets every slot (the reserve would only idle there: an eighth
of the engine's throughput at saturation); its first neighbour's first request waits for
one slot to free, and the reserve holds from then on.

Overload is refused at once instead of queued for minutes: a tenant's full queue is a 429,
the whole queue full or a wait past the deadline a 503, both with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.errors import ClientGoneError, GatewayError, OverloadedError, RateLimitError
from gateway.metrics import GatewayMetrics

logger = logging.getLogger(__name__)
_POLL_S = 0.25  # how often a waiting request checks that its client is still there
RESERVE_WINDOW_S = 10.0  # a tenant admitted this recently still counts as sharing the engine


@dataclass(eq=False)
class _Waiter:
    tenant: _Flow
    seq: int
    enqueued: float
    future: asyncio.Future[Slot] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(eq=False)
class _Flow:
    name: str
    weight: float = 1.0
    finish: float = 0.0  # virtual finish tag of its last admitted request
    in_flight: int = 0
    queue: deque[_Waiter] = field(default_factory=deque)


class Slot:
    """An engine slot; ``release`` (idempotent) hands it to the next waiting request."""

    def __init__(self, admission: FairAdmission, flow: _Flow) -> None:
        self._admission = admission
        self._flow = flow
        self._started = time.monotonic()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self._flow, time.monotonic() - self._started)


class FairAdmission:
    def __init__(self, capacity: int, *, fair: bool = True, reserve: int = 0,
                 max_queued_per_tenant: int = 64, max_queued: int = 256, deadline_s: float = 30.0,
                 metrics: GatewayMetrics | None = None,
                 reserve_window_s: float = RESERVE_WINDOW_S) -> None:
        if not 0 <= reserve < capacity:
            raise ValueError("reserve must be at least 0 and below capacity")
        self.capacity = capacity
        self.fair = fair
        self.reserve = reserve
        self.max_queued_per_tenant = max_queued_per_tenant
        self.max_queued = max_queued
        self.deadline_s = deadline_s
        self._metrics = metrics
        self._flows: dict[str, _Flow] = {}
        self._in_flight = 0
        self._queued = 0
        self._vtime = 0.0
        self._seq = 0
        self._hold_s = 1.0  # moving average of how long a request holds its slot
        self.reserve_window_s = reserve_window_s
        # Tenants by when they last took or gave back a slot, oldest first: who shares the engine.
        self._active: OrderedDict[str, float] = OrderedDict()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def queued(self, tenant: str | None = None) -> int:
        if tenant is None:
            return self._queued
        flow = self._flows.get(tenant)
        return len(flow.queue) if flow is not None else 0

    async def acquire(self, tenant: str, weight: float = 1.0,
                      disconnected: Callable[[], Awaitable[bool]] | None = None) -> Slot:
        """A slot for one of ``tenant``'s requests, waiting its fair turn.

        RateLimitError when the tenant's queue is full, OverloadedError when the whole
        queue is full or the deadline passes, ClientGoneError when ``disconnected()`` says so.
        """
        flow = self._flows.get(tenant)
        if flow is None:
            flow = self._flows[tenant] = _Flow(tenant)
        flow.weight = weight
        self._seq += 1
        waiter = _Waiter(flow, self._seq, time.monotonic())
        flow.queue.append(waiter)
        self._queued += 1
        self._dispatch()
        if waiter.future.done():
            return waiter.future.result()  # its turn at once
        full: GatewayError | None = None
        if len(flow.queue) > self.max_queued_per_tenant:
            full = RateLimitError(f"Too many requests waiting: this key may have "
                                  f"{self.max_queued_per_tenant} queued.",
                                  retry_after=self._estimate(len(flow.queue) - 1))
            self._refused(tenant, "tenant_queue_full")
        elif self._queued > self.max_queued:
            full = OverloadedError("The server is at capacity; retry shortly.",
                                   retry_after=self._estimate(self._queued - 1))
            self._refused(tenant, "queue_full")
        if full is not None:
            flow.queue.remove(waiter)
            self._queued -= 1
            raise full
        self._gauge(flow)
        try:
            return await self._wait(waiter, disconnected)
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release()  # granted as we gave up: hand it on
            elif waiter in flow.queue:
                flow.queue.remove(waiter)
                self._queued -= 1
                self._gauge(flow)
            raise

    async def _wait(self, waiter: _Waiter, disconnected: Callable[[], Awaitable[bool]] | None) -> Slot:
        deadline = waiter.enqueued + self.deadline_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._refused(waiter.tenant.name, "deadline")
                raise OverloadedError(f"No capacity within {self.deadline_s:g}s; retry shortly.",
                                      retry_after=self._estimate(self._queued))
            done, _ = await asyncio.wait({waiter.future}, timeout=min(left, _POLL_S))
            if done:
                return waiter.future.result()
            if disconnected is not None and await disconnected():
                self._refused(waiter.tenant.name, "disconnected")
                raise ClientGoneError()

    def _grant(self, flow: _Flow, waited: float) -> Slot:
        start = max(flow.finish, self._vtime)
        flow.finish = start + 1.0 / flow.weight
        self._vtime = start
        self._in_flight += 1
        flow.in_flight += 1
        self._touch(flow)
        if self._metrics is not None:
            self._metrics.queue_wait.labels(flow.name).observe(waited)
            self._metrics.admitted.set(self._in_flight)
        return Slot(self, flow)

    def _release(self, flow: _Flow, held: float) -> None:
        self._in_flight -= 1
        flow.in_flight -= 1
        self._touch(flow)
        self._hold_s += 0.1 * (held - self._hold_s)
        self._dispatch()
        if self._metrics is not None:
            self._metrics.admitted.set(self._in_flight)

    def _dispatch(self) -> None:
        while self._in_flight < self.capacity and self._queued:
            flow = self._next()
            if flow is None:
                return  # only reserved slots are free, and every waiting tenant has some in flight
            waiter = flow.queue.popleft()
            self._queued -= 1
            self._gauge(flow)
            waiter.future.set_result(self._grant(flow, time.monotonic() - waiter.enqueued))

    def _touch(self, flow: _Flow) -> None:
        self._active[flow.name] = time.monotonic()
        self._active.move_to_end(flow.name)

    def _shared(self) -> bool:
        """More than one tenant active lately (in flight, or a slot taken or given back)."""
        horizon = time.monotonic() - self.reserve_window_s
        while self._active:
            name, at = next(iter(self._active.items()))
            if at >= horizon or self._flows[name].in_flight:
                break
            del self._active[name]
        return len(self._active) > 1

    def _next(self) -> _Flow | None:
        reserved_only = (self.reserve > 0 and self._in_flight >= self.capacity - self.reserve
                         and self._shared())
        waiting = [f for f in self._flows.values() if f.queue and not (reserved_only and f.in_flight)]
        if not waiting:
            return None
        if not self.fair:
            return min(waiting, key=lambda f: f.queue[0].seq)
        return min(waiting, key=lambda f: (max(f.finish, self._vtime), f.queue[0].seq))

    def _estimate(self, ahead: int) -> float:
        """Seconds until a request with ``ahead`` others before it would likely get a slot."""
        return min(self.deadline_s, max(1.0, (ahead + 1) * self._hold_s / self.capacity))

    def _refused(self, tenant: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.queue_rejections.labels(tenant, reason).inc()

    def _gauge(self, flow: _Flow) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(flow.name).set(len(flow.queue))
