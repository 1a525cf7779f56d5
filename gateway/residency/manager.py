"""Adapter residency: from a resolved version to an adapter the engine has accepted.

Rules (shared/feasibility/README.md): an adapter reaches ``generate()`` only after
``add_lora`` accepted it; each version has one stable ``lora_int_id``; files are
verified against the registry's sha256 before the engine reads them. The gateway
also mirrors the engine's adapter memory as an LRU and removes victims itself, so
vLLM never evicts on its own and later reloads unverified files inside ``generate()``
(where a bad file would kill the engine for every tenant).

The disk tier's verified copies are ``local_copies``'s. Cold loads of different versions
run in parallel (up to ``load_concurrency``): each
version loads at most once at a time (single flight), downloads and hashing run in
threads under no shared lock, and the only shared step, reserving engine capacity and
choosing victims, is synchronous code between two awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapters_registry import AdapterVersion, TamperedRecordError, check_record
from gateway.engine import Engine, LoraSpec
from gateway.errors import (
    AdapterRejectedError,
    AdapterUnavailableError,
    CacheConflictError,
    OverloadedError,
)
from gateway.observability.metrics import GatewayMetrics
from gateway.residency.disk_cache import DiskCache, Fetcher
from gateway.residency.local_copies import LocalCopies

logger = logging.getLogger(__name__)
Tier = Literal["slot_hit", "engine_hit", "disk_hit", "remote_fetch"]
CacheName = Literal["engine", "disk"]
EvictTarget = Literal["engine", "disk", "all"]


@dataclass(frozen=True)
class Residency:
    """The tiers as routers see them: ``gpu`` is vLLM's batch slots, ``cpu`` engine memory."""

    gpu: list[tuple[AdapterVersion, bool]]  # (version, pinned)
    cpu: list[tuple[AdapterVersion, bool]]
    loading: list[AdapterVersion]  # requests wait for the engine to accept these
    slot_capacity: int  # vLLM's max_loras


@dataclass(frozen=True)
class AcquiredAdapter:
    lora: LoraSpec
    tier: Tier


class AdapterManager:
    """Three caches in front of the registry's store, each an LRU the gateway owns.

    ``slot``: the ``max_loras`` adapters vLLM keeps activated for batching, as the gateway
    sees them (the most recently served distinct adapters). ``engine``: adapters vLLM
    holds in memory (``max_cpu_loras``); the gateway adds and removes them itself.
    ``disk``: verified folders on local disk, LRU by bytes. A request is served from the
    first cache that has its adapter; its tier is that cache (``slot_hit``,
    ``engine_hit``, ``disk_hit``) or ``remote_fetch``.
    """

    def __init__(self, registry: Fetcher, engine: Engine, disk: DiskCache,
                 metrics: GatewayMetrics, *, engine_capacity: int, slot_capacity: int,
                 load_concurrency: int = 8, slot_wait_s: float = 0.0) -> None:
        self._engine = engine
        self._disk = disk
        self._metrics = metrics
        self._capacity = engine_capacity
        self._slot_capacity = slot_capacity
        self._in_engine: OrderedDict[int, None] = OrderedDict()  # LRU, oldest first
        self._loading: set[int] = set()  # capacity reserved, add_lora under way
        self._removals: dict[int, asyncio.Task[None]] = {}  # remove_lora under way
        self._slots: OrderedDict[int, None] = OrderedDict()
        self._in_use: Counter[int] = Counter()
        self._versions: dict[int, AdapterVersion] = {}  # every version seen, by lora_int_id
        self._pinned: set[int] = set()
        self._loads: dict[int, asyncio.Task[Tier]] = {}  # single flight per version
        self._local = LocalCopies(registry, disk, metrics, self._protected_shas, self._update_gauges)
        self._load_slots = asyncio.Semaphore(load_concurrency)
        self._slot_wait_s = slot_wait_s
        self._freed = asyncio.Event()  # set (and replaced) whenever engine capacity may free up
        self._rejected: dict[int, str] = {}  # lora_int_id -> why; a version never changes
        self._update_gauges()

    @asynccontextmanager
    async def use(self, version: AdapterVersion) -> AsyncIterator[AcquiredAdapter]:
        """The adapter, accepted by the engine and held there until the block exits."""
        started = time.perf_counter()
        vid = version.lora_int_id
        self._remember(version)
        # Held from the start: neither the disk nor the engine may evict it while it loads.
        self._in_use[vid] += 1
        try:
            tier = await self._make_ready(version)
            self._metrics.adapter_requests.labels(tier).inc()
            self._metrics.adapter_ready_seconds.labels(tier).observe(time.perf_counter() - started)
            yield AcquiredAdapter(self._spec(version, self._disk.path(version.content_sha256)), tier)
        finally:
            self._in_use[vid] -= 1
            if self._in_use[vid] <= 0:
                del self._in_use[vid]
                self._signal_freed()

    async def _make_ready(self, version: AdapterVersion) -> Tier:
        vid = version.lora_int_id
        if vid in self._in_engine:
            self._in_engine.move_to_end(vid)
            self._metrics.cache_hits.labels("engine").inc()
            return "slot_hit" if self._touch_slot(vid) else "engine_hit"
        self._metrics.cache_misses.labels("engine").inc()
        if vid in self._rejected:
            raise self._unavailable(version)
        load = self._loads.get(vid)
        if load is None:
            # A task, so a cancelled request cannot leave vLLM and our LRU out of step;
            # concurrent first requests for one version share it.
            load = asyncio.create_task(self._load(version))
            self._loads[vid] = load
            load.add_done_callback(lambda _t: self._loads.pop(vid, None))
        tier = await asyncio.shield(load)
        if vid in self._slots:  # the load took the slot; a newer adapter may have since
            self._slots.move_to_end(vid)
        else:
            self._touch_slot(vid)
        return tier

    def _touch_slot(self, vid: int) -> bool:
        """Record ``vid`` as the most recently batched adapter; True if it held a slot."""
        m = self._metrics
        if vid in self._slots:
            self._slots.move_to_end(vid)
            m.cache_hits.labels("slot").inc()
            return True
        m.cache_misses.labels("slot").inc()
        m.cache_loads.labels("slot").inc()
        self._slots[vid] = None
        while len(self._slots) > self._slot_capacity:
            self._slots.popitem(last=False)
            m.cache_evictions.labels("slot").inc()
        return False

    # -- operator controls: pin, prefetch, evict -----------------------------------------

    async def pin(self, version: AdapterVersion) -> Tier | None:
        """Load it into the engine and keep it there (and on disk) until unpinned."""
        vid = version.lora_int_id
        if vid in self._pinned:
            return None
        if len(self._pinned) + 1 >= self._capacity:
            raise CacheConflictError(
                f"cannot pin {version.ref}: {len(self._pinned)} of {self._capacity} engine "
                "adapter slots are pinned and at least one must stay free for the others")
        self._pinned.add(vid)  # before loading, so nothing evicts it in between
        try:
            async with self.use(version) as acquired:
                tier: Tier = acquired.tier
        except BaseException:
            self._pinned.discard(vid)
            raise
        self._update_gauges()
        logger.info("pinned %s", version.ref)
        return tier

    def unpin(self, version: AdapterVersion) -> bool:
        if version.lora_int_id not in self._pinned:
            return False
        self._pinned.discard(version.lora_int_id)
        self._update_gauges()
        self._signal_freed()
        logger.info("unpinned %s", version.ref)
        return True

    async def prefetch(self, version: AdapterVersion, into: CacheName) -> str:
        """Warm one tier ahead of traffic; returns where the adapter was before."""
        if into == "disk":
            self._remember(version)
            if version.lora_int_id in self._in_engine:
                return "engine_hit"
            _path, tier = await self._local.ensure(version)
            return tier
        async with self.use(version) as acquired:
            return acquired.tier

    async def evict(self, version: AdapterVersion, where: EvictTarget) -> list[str]:
        """Drop it from the engine, the disk, or both; refused while pinned or in use."""
        vid = version.lora_int_id
        self._remember(version)
        if vid in self._pinned:
            raise CacheConflictError(f"{version.ref} is pinned; unpin it first")
        if self._in_use[vid] or vid in self._loading:
            raise CacheConflictError(f"{version.ref} is serving requests; retry when idle")
        done: list[str] = []
        if where in ("engine", "all") and vid in self._in_engine:
            await self._start_removal(vid)
            done.append("engine")
        if where in ("disk", "all"):
            sha = version.content_sha256
            if sha in self._protected_shas():
                raise CacheConflictError(
                    f"{version.ref}'s files are held by the engine, a pin or a request in flight "
                    "(this version or one with identical files); evict from 'all' instead")
            if sha in self._disk:
                freed = await asyncio.to_thread(self._disk.discard, sha)
                self._metrics.cache_evictions.labels("disk").inc()
                logger.info("evicted %s from disk (%d bytes)", version.ref, freed)
                done.append("disk")
        self._update_gauges()
        return done

    def cache_state(self) -> dict[str, Any]:
        entries = []
        for vid in self._in_engine:
            v = self._versions[vid]
            entries.append({"adapter": v.ref, "lora_int_id": vid, "in_slot": vid in self._slots,
                            "pinned": vid in self._pinned, "in_use": self._in_use[vid]})
        disk_refs = sorted(v.ref for v in self._versions.values() if v.content_sha256 in self._disk)
        return {
            "slot": {"capacity": self._slot_capacity, "used": len(self._slots)},
            "engine": {"capacity": self._capacity, "used": len(self._in_engine), "adapters": entries,
                       "loading": len(self._loading)},
            "disk": {"max_bytes": self._disk.max_bytes, "bytes": self._disk.total_bytes,
                     "folders": len(self._disk), "known_adapters": disk_refs},
            "pinned": sorted(self._versions[v].ref for v in self._pinned),
        }

    def residency(self) -> Residency:
        """Where each adapter is now; a request in flight alone never counts as resident."""
        def level(vids: list[int]) -> list[tuple[AdapterVersion, bool]]:
            return [(self._versions[v], v in self._pinned) for v in vids]

        return Residency(
            gpu=level([v for v in self._in_engine if v in self._slots]),
            cpu=level([v for v in self._in_engine if v not in self._slots]),
            loading=[self._versions[v] for v, n in self._in_use.items()
                     if n > 0 and v not in self._in_engine],
            slot_capacity=self._slot_capacity)

    async def engine_reports(self) -> list[int]:
        """The adapters vLLM itself says it holds, to check against the gateway's own LRU."""
        return sorted(await self._engine.list_loras())

    # -- internals ------------------------------------------------------------------------

    def _remember(self, version: AdapterVersion) -> None:
        """Track ``version``, once its record proves it is one the registry wrote.

        Its digest names a folder under the cache and its file names are joined to that
        folder: a row altered in the database must never become a path (vLLM #46287,
        AIBrix #2296), so it is refused before any lookup, download or eviction.
        """
        try:
            check_record(version.content_sha256, version.files)
        except TamperedRecordError as exc:
            logger.error("registry record of %s is not servable: %s", version.ref, exc)
            raise AdapterUnavailableError(
                f"adapter {version.ref} cannot be served: its registry record was altered "
                f"({exc}); the operator must delete and re-register it") from exc
        self._versions[version.lora_int_id] = version

    def _spec(self, version: AdapterVersion, path: Path) -> LoraSpec:
        return LoraSpec(name=version.ref, int_id=version.lora_int_id, path=path)

    def _protected_shas(self) -> set[str]:
        # Engine-resident adapters keep their folder too: should vLLM ever reload one, the
        # files must be there (a missing path inside generate() can kill the engine).
        held = (set(self._pinned) | set(self._in_engine) | self._loading
                | {v for v, n in self._in_use.items() if n > 0})
        return {self._versions[v].content_sha256 for v in held}

    def _update_gauges(self) -> None:
        m = self._metrics
        m.cache_entries.labels("slot").set(len(self._slots))
        m.cache_entries.labels("engine").set(len(self._in_engine))
        m.cache_entries.labels("disk").set(len(self._disk))
        m.disk_cache_bytes.set(self._disk.total_bytes)
        m.pinned.set(len(self._pinned))

    async def _load(self, version: AdapterVersion) -> Tier:
        """Make a verified local copy, reserve engine capacity, hand it to the engine.

        A load permit (``load_concurrency``) is held to fetch and verify, and again to add
        to the engine, but not while waiting for an engine slot: a load that waits for a
        request to release one must not hold up other adapters' downloads.
        """
        vid = version.lora_int_id
        async with self._load_slots:
            # A fresh download was verified as it was fetched; a folder found on disk may
            # have changed since (or been tampered with): it is hashed before vLLM reads it.
            path, tier = await self._local.verified(version)
        if vid in self._rejected:
            raise self._unavailable(version)
        pending = self._removals.get(vid)
        if pending is not None:  # evicted a moment ago: let vLLM finish removing it first
            await pending
        victims = await self._claim(version)
        try:
            async with self._load_slots:
                started = time.perf_counter()
                if victims:
                    await asyncio.gather(*victims)
                await self._engine.add_lora(self._spec(version, path))
        except AdapterRejectedError as exc:
            logger.error("engine rejected %s: %s", version.ref, exc)
            self._rejected[vid] = str(exc)
            raise self._unavailable(version) from exc
        finally:
            self._loading.discard(vid)
            self._signal_freed()
        self._in_engine[vid] = None
        # Its waiters are batched next: the slot is theirs from now, so a request that
        # arrives before they resume is a slot hit, not an engine hit.
        self._touch_slot(vid)
        self._metrics.cache_loads.labels("engine").inc()
        self._metrics.cache_load_seconds.labels("engine").observe(time.perf_counter() - started)
        self._update_gauges()
        logger.info("engine accepted %s (lora_int_id=%d)", version.ref, vid)
        return tier

    async def _claim(self, version: AdapterVersion) -> list[asyncio.Task[None]]:
        """``_reserve``, waiting up to ``slot_wait_s`` while every slot serves requests."""
        deadline = time.monotonic() + self._slot_wait_s
        waited = False
        while True:
            freed = self._freed  # taken before trying: a slot freed in between is not missed
            try:
                return self._reserve(version.lora_int_id)
            except OverloadedError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
            if not waited:
                waited = True
                logger.info("every engine slot serves requests: %s waits up to %.1fs for one",
                            version.ref, left)
            with contextlib.suppress(TimeoutError):  # then one last try, then the refusal
                await asyncio.wait_for(freed.wait(), left)

    def _signal_freed(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    def _reserve(self, vid: int) -> list[asyncio.Task[None]]:
        """Claim one engine slot for ``vid``, starting the removal of LRU victims if full.

        Synchronous on purpose: no other coroutine runs between counting and claiming.
        """
        victims = []
        while len(self._in_engine) + len(self._loading) >= self._capacity:
            victim = next((v for v in self._in_engine
                           if not self._in_use[v] and v not in self._pinned), None)
            if victim is None:
                raise OverloadedError(
                    f"all {self._capacity} adapter slots are serving requests, loading or pinned; "
                    "retry shortly", retry_after=1.0)
            victims.append(self._start_removal(victim))
        self._loading.add(vid)
        return victims

    def _start_removal(self, vid: int) -> asyncio.Task[None]:
        del self._in_engine[vid]
        self._slots.pop(vid, None)
        task = asyncio.create_task(self._engine.remove_lora(vid))
        self._removals[vid] = task

        def done(t: asyncio.Task[None]) -> None:
            self._removals.pop(vid, None)
            if not t.cancelled() and t.exception() is not None:
                logger.error("engine failed to remove lora_int_id=%d: %s", vid, t.exception())

        task.add_done_callback(done)
        self._metrics.cache_evictions.labels("engine").inc()
        self._update_gauges()
        return task

    def _unavailable(self, version: AdapterVersion) -> AdapterUnavailableError:
        return AdapterUnavailableError(
            f"adapter {version.ref} was rejected by the inference engine; "
            "the operator must fix and re-register it")
