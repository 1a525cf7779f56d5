"""The disk tier: a verified local copy of a version's files, fetched once at a time.

Concurrent first requests for one artifact share one download, run as its own task so a
cancelled requester cannot fail the others; a failure is not cached. A copy found on
disk is hashed again before the engine reads it (it may have changed since it was
verified, or been tampered with).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from adapters_registry import AdapterVersion
from gateway.observability.metrics import GatewayMetrics
from gateway.residency.disk_cache import DiskCache, Fetcher, download, matches_record

logger = logging.getLogger(__name__)
LocalTier = Literal["disk_hit", "remote_fetch"]


class LocalCopies:
    """Verified folders in ``disk``, fetched from the registry's store on a miss.

    ``protected()`` names the digests the disk must not evict to make room (those the
    engine, a pin or a request in flight holds)."""

    def __init__(self, registry: Fetcher, disk: DiskCache, metrics: GatewayMetrics,
                 protected: Callable[[], set[str]], on_change: Callable[[], None]) -> None:
        self._registry = registry
        self._disk = disk
        self._metrics = metrics
        self._protected = protected
        self._on_change = on_change  # the disk's contents changed (gauges)
        self._fetches: dict[str, asyncio.Task[Path]] = {}  # single flight per artifact

    async def ensure(self, version: AdapterVersion) -> tuple[Path, LocalTier]:
        """The version's folder, and whether it was on disk already."""
        sha = version.content_sha256
        path = await asyncio.to_thread(self._disk.lookup, sha)
        if path is not None:
            self._metrics.cache_hits.labels("disk").inc()
            return path, "disk_hit"
        self._metrics.cache_misses.labels("disk").inc()
        task = self._fetches.get(sha)
        if task is None:
            task = asyncio.create_task(self._fetch(version))
            self._fetches[sha] = task
            task.add_done_callback(lambda _t: self._fetches.pop(sha, None))
        return await asyncio.shield(task), "remote_fetch"

    async def verified(self, version: AdapterVersion) -> tuple[Path, LocalTier]:
        """``ensure``, with a copy found on disk hashed again (and fetched anew if it fails)."""
        path, tier = await self.ensure(version)
        if tier == "disk_hit" and not await asyncio.to_thread(matches_record, version, path):
            logger.warning("local copy of %s failed verification; fetching again", version.ref)
            await asyncio.to_thread(self._disk.discard, version.content_sha256)
            path, _ = await self.ensure(version)
        return path, tier

    async def _fetch(self, version: AdapterVersion) -> Path:
        started = time.perf_counter()
        path = await asyncio.to_thread(download, self._registry, self._disk, version)
        evicted = await asyncio.to_thread(self._disk.admit, version.content_sha256,
                                          self._protected() | {version.content_sha256})
        m = self._metrics
        m.cache_loads.labels("disk").inc()
        m.cache_load_seconds.labels("disk").observe(time.perf_counter() - started)
        m.cache_evictions.labels("disk").inc(len(evicted))
        self._on_change()
        return path


__all__ = ["LocalCopies", "LocalTier"]
