"""Registry changes pushed to this replica: PostgreSQL LISTEN, with the TTL as the fallback.

Every registry mutation that changes a resolution, a tenant's keys or its limits
announces itself in its own transaction (``adapters_registry.changes``). This module
listens on the registry's channel and drops exactly the cache entries a notice makes
stale. While the channel is down the caches keep their resolve TTL, so a change is
seen within the TTL instead of at once: the outage is logged once and metered
(``lgw_invalidation_channel_up`` 0). Notices sent while disconnected are lost, so every
(re)connection drops everything cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from adapters_registry import CHANNEL_SQL, Change, Registry, Tenant, ValidationError, listen_params
from gateway.observability.metrics import GatewayMetrics
from gateway.protection.quotas import Quotas
from gateway.tenancy.directory import TenantDirectory

logger = logging.getLogger(__name__)

APPLICATION_NAME = "lora-gateway changes"  # how the listener shows in pg_stat_activity
MAX_RETRY_S = 30.0
HEARTBEAT_S = 10.0  # a silent connection is probed this often, so a dead link is noticed

OnChange = Callable[[Change | None], None]  # None: anything may have changed


def apply_change(change: Change | None, tenants: TenantDirectory, quotas: Quotas) -> None:
    """Drop what ``change`` made stale; everything when it is None."""
    tenants.invalidate(change)
    if change is None:
        quotas.forget()
    elif change.kind == "limits":
        quotas.forget(Tenant(change.tenant_id, change.tenant))


class ChangeListener:
    """One LISTEN connection to the registry database, reconnecting with backoff."""

    def __init__(self, params: dict[str, Any], on_change: OnChange, metrics: GatewayMetrics, *,
                 ttl: float, retry_s: float, heartbeat_s: float = HEARTBEAT_S) -> None:
        # The database URL's own settings win over these defaults.
        defaults = {"application_name": APPLICATION_NAME, "connect_timeout": max(1, round(heartbeat_s))}
        self._params: dict[str, Any] = defaults | params
        self._on_change = on_change
        self._ttl = ttl
        self._retry_s = retry_s
        self._heartbeat_s = heartbeat_s
        self._up = metrics.invalidation_channel_up.labels("postgres")
        self._notices = metrics.invalidation_notices
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self.backend_pid: int | None = None  # the listening connection's server process

    def start(self) -> None:
        self._up.set(0)
        self._task = asyncio.create_task(self._run(), name="registry change listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        import psycopg  # the postgres extra: only when the registry is on PostgreSQL

        delay = self._retry_s
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(autocommit=True, **self._params) as conn:
                    await self._listen(conn)
                    delay = self._retry_s
                    await self._receive(conn)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._lost(exc)
            except Exception as exc:  # a bug here must not end the listener silently
                logger.exception("registry changes: listener failed")
                self._lost(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)

    async def _listen(self, conn: Any) -> None:
        from psycopg import sql

        row = await (await conn.execute(f"SELECT {CHANNEL_SQL}")).fetchone()
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(row[0])))
        self.backend_pid = conn.info.backend_pid
        self._up.set(1)
        if self._down_since is None:
            logger.info("registry changes: listening on PostgreSQL channel %s", row[0])
        else:
            logger.warning("registry changes: channel back after %.1fs; dropping every cached "
                           "resolution, key and limit (notices sent meanwhile were lost)",
                           time.monotonic() - self._down_since)
            self._down_since = None
        # Also on the first connection: anything cached before LISTEN may be stale already.
        self._apply(None, "all")

    async def _receive(self, conn: Any) -> None:
        while True:
            async for notice in conn.notifies(timeout=self._heartbeat_s):
                try:
                    change = Change.parse(notice.payload)
                except ValidationError as exc:
                    logger.error("registry changes: unreadable notice, dropping every cached "
                                 "entry: %s", exc)
                    self._apply(None, "unreadable")
                else:
                    self._apply(change, change.kind)
            # Quiet for a heartbeat: make sure the connection is still alive.
            await asyncio.wait_for(conn.execute("SELECT 1"), self._heartbeat_s)

    def _apply(self, change: Change | None, label: str) -> None:
        self._notices.labels(label).inc()
        self._on_change(change)
        if change is not None:
            logger.debug("registry changes: %s of %s/%s", change.kind, change.tenant,
                         change.adapter or "*")

    def _lost(self, exc: BaseException) -> None:
        self._up.set(0)
        self.backend_pid = None
        if self._down_since is None:  # once per outage, not per reconnection attempt
            self._down_since = time.monotonic()
            logger.error("registry changes: channel down (%s); caches fall back to the "
                         "resolve TTL (%gs) until it reconnects", _first_line(exc), self._ttl)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def start_listener(registry: Registry, tenants: TenantDirectory, quotas: Quotas,
                   metrics: GatewayMetrics, *, enabled: bool, ttl: float,
                   retry_s: float) -> ChangeListener | None:
    """The running listener, or None (logged) when the registry has no change channel."""
    params = listen_params(registry.db)
    if params is None or not enabled:
        why = ("switched off (registry_changes_channel=false)" if not enabled
               else "the registry database is not PostgreSQL (one replica only)")
        logger.warning("registry changes: no push channel, %s: changes are seen within the "
                       "resolve TTL (%gs)", why, ttl)
        return None
    listener = ChangeListener(params, lambda change: apply_change(change, tenants, quotas),
                              metrics, ttl=ttl, retry_s=retry_s)
    listener.start()
    return listener


__all__ = ["ChangeListener", "apply_change", "start_listener"]
