"""How long the gateway trusts what it read from the registry: TTL caches, kept fresh by
one cheap read of the registry's change counter instead of one lookup per entry.

Keys, resolutions and limits are cached for ``ttl`` seconds. A ``GenerationWatch`` reads
the registry's generation (bumped in every change's own transaction) every third of a
TTL: when two readings are equal, nothing changed in between, so every entry loaded after
the first reading is confirmed as of the second and lives a TTL more, without a lookup.
When the generation moved, or the read failed, nothing is confirmed and each entry in use
refreshes itself in the background as it ages (the TTL alone): one change costs one
lookup per entry in use, once. So 64 adapters in steady use cost one query per third of a
TTL, not 64 per half-TTL, and nothing older than the TTL is served while the registry
answers.

While its database cannot be reached (``DatabaseUnreachableError``: a restart, a network
cut), a cache with an ``outage_grace`` serves what the registry said last, up to that long
past the TTL, instead of failing every request: nobody can change a key, an alias or a
limit in a database that is away, so the last answer is the best one there is. One lookup
per second per cache finds out when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from adapters_registry import DatabaseUnreachableError
from gateway.errors import GatewayError
from gateway.observability.logs import Throttled

logger = logging.getLogger(__name__)
_outage = Throttled(logger)
RETRY_WHILE_AWAY_S = 1.0  # while the database is away: one lookup per second per cache
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class GenerationWatch:
    """Reads the registry's change counter every ``ttl / 3`` and confirms its caches' entries.

    Readings are counted. An entry records how many readings had completed when its
    lookup started (its ``tag``): its lookup saw the database no earlier than those
    readings did. The counter only grows, so when a reading equals the last good one,
    which completed as reading ``n``, entries tagged ``n`` or later are current as of the
    new reading's start, and are re-tagged with it.
    """

    def __init__(self, read: Callable[[], int], ttl: float) -> None:
        self._read = read
        self.interval = ttl / 3
        self.readings = 0  # completed readings
        self._last: int | None = None  # the last good reading
        self._last_done = 0  # how many readings had completed when it did
        self._caches: weakref.WeakSet[TtlCache[Any, Any]] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None

    def watch(self, cache: TtlCache[Any, Any]) -> None:
        self._caches.add(cache)

    async def check(self) -> int:
        """One reading; returns how many entries it confirmed."""
        started = time.monotonic()
        try:
            value = await asyncio.to_thread(self._read)
        except Exception as exc:  # the database is down: entries age on their TTL alone
            logger.debug("registry generation unreadable: %s", exc)
            self.readings += 1
            return 0
        confirmed = 0
        if value == self._last:
            # The counter only grows: equal to the last good reading, nothing changed since.
            for cache in list(self._caches):
                confirmed += cache.confirm(self._last_done, self.readings + 1, started)
        self.readings += 1
        self._last, self._last_done = value, self.readings
        return confirmed

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="registry generation watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)


class TtlCache(Generic[K, V]):
    """Values trusted for ``ttl`` seconds; refreshed ahead of expiry while in use.

    ``get_or_load`` returns a fresh value without awaiting anything when it has one. Late
    in an entry's life (its last third with a ``watch``, else its second half) a hit also
    starts one background reload, so a key in steady use is reloaded before it expires and
    never blocks a caller; the entry itself still expires on time, so nothing older than
    ``ttl`` is ever served. With a ``watch``, entries it confirms live on without reloads.
    A failed load is not cached: the next caller tries again. With ``outage_grace``, an
    entry whose reload finds the database unreachable is served up to that long past its
    expiry (see the module's docstring).
    """

    def __init__(self, ttl: float, max_entries: int = 100_000, *,
                 watch: GenerationWatch | None = None, outage_grace: float = 0.0) -> None:
        self.ttl = ttl
        self.outage_grace = outage_grace
        self._away_since: float | None = None  # the database was unreachable at the last lookup
        self._retry_at = 0.0
        self.max_entries = max_entries
        self._watch = watch
        # Reload a hit this close to its expiry: after the watch had its chance to confirm it.
        self._refresh_within = ttl / 3 if watch is not None else ttl / 2
        self._data: OrderedDict[K, tuple[float, V, int]] = OrderedDict()  # expiry, value, tag
        self._loads: dict[K, asyncio.Future[V]] = {}
        self._epoch = 0  # bumped by every invalidation
        if watch is not None:
            watch.watch(self)

    async def get_or_load(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        hit = self._data.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            if hit[0] - now < self._refresh_within and key not in self._loads:
                self._start_load(key, load).add_done_callback(_consume_exception)
            return hit[1]
        stale = hit is not None and now < hit[0] + self.outage_grace
        if stale and self._away_since is not None:
            assert hit is not None
            # Away at the last lookup: answer at once with what the registry said last.
            if now >= self._retry_at and key not in self._loads:
                self._retry_at = now + RETRY_WHILE_AWAY_S
                self._start_load(key, load).add_done_callback(_consume_exception)
            return hit[1]
        future = self._loads.get(key) or self._start_load(key, load)
        try:
            return await asyncio.shield(future)
        except DatabaseUnreachableError:
            if not stale:
                raise
            assert hit is not None
            return hit[1]

    @property
    def registry_away(self) -> bool:
        """The last lookup found the registry's database unreachable."""
        return self._away_since is not None

    def __len__(self) -> int:
        return len(self._data)

    def confirm(self, since: int, tag: int, at: float) -> int:
        """Entries tagged ``since`` or later are current as of ``at``: trust them a TTL from
        then, tagged ``tag``. Returns how many."""
        expiry = at + self.ttl
        confirmed = 0
        for key, (old_expiry, value, seen) in list(self._data.items()):
            if seen >= since and old_expiry > at:
                self._data[key] = (max(old_expiry, expiry), value, tag)
                confirmed += 1
        return confirmed

    def invalidate(self, key: K | None = None) -> None:
        """Forget one key, or everything."""
        if key is None:
            self._data.clear()
        else:
            self._data.pop(key, None)
        self._forget_loads()

    def invalidate_where(self, stale: Callable[[K, V], bool]) -> int:
        """Forget every entry ``stale(key, value)`` picks; returns how many."""
        keys = [key for key, (_, value, _) in self._data.items() if stale(key, value)]
        for key in keys:
            del self._data[key]
        self._forget_loads()
        return len(keys)

    def _forget_loads(self) -> None:
        # A lookup in flight may have read the database before the change: its callers get
        # its answer, but it is not cached, and later callers start a lookup of their own.
        self._epoch += 1
        self._loads.clear()

    def _start_load(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        epoch = self._epoch
        tag = self._watch.readings if self._watch is not None else 0

        async def run() -> V:
            started = time.monotonic()
            try:
                value = await load()
            except GatewayError as exc:
                if exc.status < 500 and epoch == self._epoch:
                    self._data.pop(key, None)  # a definite "no" (key revoked, name gone) ends the entry now
                raise
            except DatabaseUnreachableError as exc:
                self._retry_at = time.monotonic() + RETRY_WHILE_AWAY_S
                if self._away_since is None:
                    self._away_since = time.monotonic()
                if self.outage_grace > 0:
                    _outage.log(logging.WARNING, "away", "registry database unreachable: serving what "
                                "it said last, for up to %.0fs past its TTL (registry_outage_grace_seconds)"
                                ": %s", self.outage_grace, exc)
                raise
            finally:
                if self._loads.get(key) is future:
                    del self._loads[key]
            if self._away_since is not None:
                logger.warning("registry database reachable again after %.1fs",
                               time.monotonic() - self._away_since)
                self._away_since = None
            if epoch != self._epoch:
                return value
            # Valid from when the lookup started: a value is never trusted past its TTL.
            self._data[key] = (started + self.ttl, value, tag)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
            return value

        future = asyncio.ensure_future(run())
        self._loads[key] = future
        return future


def _consume_exception(future: asyncio.Future[Any]) -> None:
    # A background refresh that failed leaves the entry to expire; the next caller
    # after that loads it again and sees the error itself.
    if future.cancelled() or future.exception() is None:
        return
    exc = future.exception()
    if isinstance(exc, DatabaseUnreachableError):
        return  # said once per outage (TtlCache._start_load)
    if isinstance(exc, GatewayError) and exc.status < 500:
        logger.debug("background refresh: %s", exc)  # the entry is gone; its next caller is told
    else:
        logger.warning("background refresh failed: %s", exc)


__all__ = ["GenerationWatch", "TtlCache"]
