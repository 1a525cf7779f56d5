"""Per-tenant quotas: requests and tokens per minute, requests in flight, request ceilings.

    QuotaStore          atomic per-tenant state: admit, charge tokens, release a lease
    ├── LocalQuotaStore this process only (no ``redis_url``)
    └── RedisQuotaStore every replica at once (``gateway.protection.redis_quotas``, Lua scripts)
    Quotas              the service: a tenant's limits (registry over settings), the failure mode
    UsageMeter          one request's lease (``gateway.protection.usage``)

Rates are token buckets that refill continuously, a full bucket per minute: ``rpm`` requests
and ``tpm`` tokens. A request needs one request token and a token bucket not in debt; its
prompt must fit in the token bucket; completion tokens are charged as they are generated and
may take the bucket into debt, which the tenant's next requests wait out. The answer's
``x-ratelimit-*`` headers are OpenAI's: limit, remaining, and the time until the bucket is full.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters_registry import LIMITS, Tenant, TenantLimits
from gateway.errors import OverloadedError
from gateway.observability.metrics import GatewayMetrics
from gateway.tenancy.freshness import GenerationWatch, TtlCache

logger = logging.getLogger(__name__)
WINDOW_S = 60.0  # a bucket refills fully in a minute
LEASE_TTL_S = 600.0  # a lease (request in flight) a crashed replica left behind expires after this
FLUSH_TOKENS = 32  # completion tokens charged to the store in batches of this many
_LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class Limits(TenantLimits):
    """A tenant's effective limits: its own from the registry, else the gateway's defaults
    (every limit of ``adapters_registry.limits``; a weight always has a value)."""

    weight: float = 1.0

    @classmethod
    def merged(cls, own: TenantLimits, defaults: Limits) -> Limits:
        def pick(name: str) -> Any:
            value = getattr(own, name)
            return getattr(defaults, name) if value is None else value
        return cls(**{spec.name: pick(spec.name) for spec in LIMITS})


@dataclass(frozen=True)
class Bucket:
    limit: int
    remaining: float
    reset_s: float  # until the bucket is full again


@dataclass(frozen=True)
class Verdict:
    """What the store decided, and the tenant's buckets after it."""

    refused: str | None = None  # "concurrency", "requests", "tokens" or None
    retry_after: float | None = None  # seconds; None where waiting cannot help
    requests: Bucket | None = None
    tokens: Bucket | None = None


class QuotaStore(Protocol):
    """Atomic per tenant. Raises ConnectionError when the store cannot answer."""

    async def admit(self, tenant_id: int, limits: Limits, lease: str) -> Verdict: ...

    async def charge(self, tenant_id: int, limits: Limits, lease: str, tokens: int, *,
                     check: bool) -> Verdict: ...

    async def release(self, tenant_id: int, lease: str) -> None: ...

    async def close(self) -> None: ...


# -- the bucket arithmetic, shared by the local store (the Lua scripts do the same) ----------

def refilled(level: float, since: float, now: float, cap: int, old_cap: int) -> float:
    """The level now; a changed limit moves the level by the change (a raise applies at once)."""
    return min(float(cap), level + (cap - old_cap) + max(0.0, now - since) * cap / WINDOW_S)


def bucket(level: float, cap: int) -> Bucket:
    return Bucket(cap, level, (cap - level) * WINDOW_S / cap)


def wait_for(need: float, level: float, cap: int) -> float:
    """Seconds until ``level`` refills to ``need``."""
    return max(0.0, (need - level) * WINDOW_S / cap)


@dataclass
class _Local:
    requests: tuple[float, float, int] | None = None  # (level, at, limit)
    tokens: tuple[float, float, int] | None = None
    leases: dict[str, float] = field(default_factory=dict)  # lease -> expiry


class LocalQuotaStore:
    """Quotas of this process alone: with N replicas, each allows the full limit."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tenants: dict[int, _Local] = {}

    async def admit(self, tenant_id: int, limits: Limits, lease: str) -> Verdict:
        now = self._clock()
        st = self._tenants.setdefault(tenant_id, _Local())
        st.leases = {k: exp for k, exp in st.leases.items() if exp > now}
        req = self._level(st.requests, limits.rpm, now)
        tok = self._level(st.tokens, limits.tpm, now)
        refused = admit_decision(limits, req, tok, len(st.leases))
        if refused is None:
            if limits.rpm is not None:
                req -= 1
                st.requests = (req, now, limits.rpm)
            if limits.concurrency is not None:
                st.leases[lease] = now + LEASE_TTL_S
        return admit_verdict(refused, limits, req, tok)

    async def charge(self, tenant_id: int, limits: Limits, lease: str, tokens: int, *,
                     check: bool) -> Verdict:
        now = self._clock()
        st = self._tenants.setdefault(tenant_id, _Local())
        if lease in st.leases:
            st.leases[lease] = now + LEASE_TTL_S
        if limits.tpm is None:
            return Verdict()
        tok = self._level(st.tokens, limits.tpm, now)
        refused = check and tokens > tok
        if not refused:
            tok -= tokens
            st.tokens = (tok, now, limits.tpm)
        return charge_verdict(refused, limits.tpm, tok, tokens)

    async def release(self, tenant_id: int, lease: str) -> None:
        st = self._tenants.get(tenant_id)
        if st is not None:
            st.leases.pop(lease, None)

    async def close(self) -> None:
        self._tenants.clear()

    @staticmethod
    def _level(state: tuple[float, float, int] | None, cap: int | None, now: float) -> float:
        if cap is None:
            return 0.0
        return float(cap) if state is None else refilled(*state[:2], now, cap, state[2])


def admit_decision(limits: Limits, req: float, tok: float, in_flight: int) -> str | None:
    """Which limit refuses a request, from the refilled levels (the Lua script mirrors it)."""
    if limits.concurrency is not None and in_flight >= limits.concurrency:
        return "concurrency"
    if limits.rpm is not None and req < 1:
        return "requests"
    if limits.tpm is not None and tok < 1:
        return "tokens"
    return None


def admit_verdict(refused: str | None, limits: Limits, req: float, tok: float) -> Verdict:
    """The verdict from the decision and the levels after it."""
    requests = bucket(req, limits.rpm) if limits.rpm is not None else None
    tokens = bucket(tok, limits.tpm) if limits.tpm is not None else None
    retry = None
    if refused == "concurrency":
        retry = 1.0  # a request in flight ends: nothing predicts when
    elif refused == "requests" and limits.rpm is not None:
        retry = wait_for(1, req, limits.rpm)
    elif refused == "tokens" and limits.tpm is not None:
        retry = wait_for(1, tok, limits.tpm)
    return Verdict(refused, retry, requests, tokens)


def charge_verdict(refused: bool, tpm: int, tok: float, tokens: int) -> Verdict:
    if not refused:
        return Verdict(tokens=bucket(tok, tpm))
    # A prompt over the whole minute's budget never fits: no Retry-After for it.
    retry = None if tokens > tpm else wait_for(tokens, tok, tpm)
    return Verdict("tokens", retry, None, bucket(tok, tpm))


# -- the service -----------------------------------------------------------------------------

class LimitsSource(Protocol):
    """Where a tenant's own limits come from (the registry's tenancy service)."""

    def get_limits(self, tenant_name: str) -> TenantLimits: ...


class Quotas:
    """Admits a tenant's request against its limits, in whichever store is configured."""

    def __init__(self, store: QuotaStore, registry: LimitsSource, defaults: Limits,
                 metrics: GatewayMetrics, *, fail_open: bool, ttl: float,
                 watch: GenerationWatch | None = None, outage_grace: float = 0.0) -> None:
        self.store = store
        self._registry = registry
        self.defaults = defaults
        self.metrics = metrics
        self.fail_open = fail_open
        self._limits: TtlCache[int, Limits] = TtlCache(ttl, watch=watch, outage_grace=outage_grace)
        self._last_logged = -math.inf

    async def limits(self, tenant: Tenant) -> Limits:
        async def load() -> Limits:
            own = await asyncio.to_thread(self._registry.get_limits, tenant.name)
            return Limits.merged(own, self.defaults)
        return await self._limits.get_or_load(tenant.id, load)

    def forget(self, tenant: Tenant | None = None) -> None:
        """Drop the cached limits of ``tenant`` (of every tenant when None): seen at once."""
        self._limits.invalidate(None if tenant is None else tenant.id)

    async def call(self, op: Awaitable[Verdict]) -> Verdict | None:
        """The store's answer; None when it failed and the mode is open (503 when closed)."""
        try:
            return await op
        except (ConnectionError, TimeoutError) as exc:
            self.store_failed(exc)
            return None

    def store_failed(self, exc: BaseException) -> None:
        outcome = "failed_open" if self.fail_open else "failed_closed"
        self.metrics.quota_backend_errors.labels(outcome).inc()
        now = time.monotonic()
        if now - self._last_logged >= _LOG_EVERY_S:  # one line per burst of failures, not per request
            self._last_logged = now
            logger.error("quota store failed (%s): %s", "serving without quotas" if self.fail_open
                         else "refusing requests with 503", exc)
        if not self.fail_open:
            raise OverloadedError("Rate limits cannot be checked right now; retry shortly.",
                                  retry_after=1) from None
