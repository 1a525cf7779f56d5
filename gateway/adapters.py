"""From a tenant's ``model`` to an adapter the engine has accepted.

Rules (shared/feasibility/README.md): an adapter reaches ``generate()`` only after
``add_lora`` accepted it; each version has one stable ``lora_int_id``; files are
verified against the registry's sha256 before the engine reads them. The gateway
also mirrors the engine's adapter memory as an LRU and removes victims itself, so
vLLM never evicts on its own and later reloads unverified files inside ``generate()``
(where a bad file would kill the engine for every tenant).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from adapters_registry import Registry
from adapters_registry.errors import (
    ArtifactError,
    AuthenticationError,
    NotFoundError,
)
from adapters_registry.hashing import sha256_file
from adapters_registry.keys import key_hash
from adapters_registry.records import AdapterVersion, Tenant
from gateway.engine import AdapterRejectedError, Engine, LoraSpec
from gateway.errors import (
    AdapterUnavailableError,
    AuthenticationFailedError,
    ModelNotFoundError,
    OverloadedError,
)
from gateway.metrics import GatewayMetrics

logger = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A tiny time-bounded cache: entries are trusted for ``ttl`` seconds."""

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        hit = self._data.get(key)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, key: K, value: V) -> None:
        self._data[key] = (time.monotonic() + self.ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)


@dataclass(frozen=True)
class AcquiredAdapter:
    lora: LoraSpec
    tier: str  # engine_hit | disk_hit | remote_fetch


class AdapterManager:
    def __init__(self, registry: Registry, engine: Engine, cache_dir: Path,
                 metrics: GatewayMetrics, *, served_base: tuple[str, str], ttl: float,
                 engine_capacity: int) -> None:
        self._served_base = served_base  # (model_id, revision)
        self._registry = registry
        self._engine = engine
        self._cache_dir = Path(cache_dir)
        self._metrics = metrics
        self._keys: TtlCache[str, Tenant] = TtlCache(ttl)
        self._resolved: TtlCache[tuple[int, str], AdapterVersion] = TtlCache(ttl)
        self._capacity = engine_capacity
        self._in_engine: OrderedDict[int, None] = OrderedDict()  # LRU, oldest first
        self._in_use: Counter[int] = Counter()
        self._names: dict[int, str] = {}
        self._engine_lock = asyncio.Lock()
        self._fetches: dict[str, asyncio.Task[Path]] = {}
        self._rejected: dict[int, str] = {}  # lora_int_id -> why; a version never changes
        self._cache_dir.mkdir(parents=True, exist_ok=True)

    async def authenticate(self, api_key: str) -> Tenant:
        digest = key_hash(api_key)  # never a secret as a cache key
        tenant = self._keys.get(digest)
        if tenant is None:
            try:
                tenant = await asyncio.to_thread(self._registry.authenticate, api_key)
            except AuthenticationError as exc:
                raise AuthenticationFailedError(str(exc)) from None
            self._keys.put(digest, tenant)
        return tenant

    async def resolve(self, tenant: Tenant, model: str) -> AdapterVersion:
        version = self._resolved.get((tenant.id, model))
        if version is None:
            try:
                version = await asyncio.to_thread(self._registry.resolve, tenant, model)
            except NotFoundError:
                raise ModelNotFoundError(model) from None
            if (version.base_model_id, version.base_revision) != self._served_base:
                # Built for another base (or revision): its shapes were never checked
                # against this one, and vLLM may serve garbage silently. Not ours to serve.
                raise ModelNotFoundError(model)
            self._resolved.put((tenant.id, model), version)
        return version

    async def list_models(self, tenant: Tenant) -> list[Any]:
        return await asyncio.to_thread(self._registry.list_adapters, tenant)

    @asynccontextmanager
    async def use(self, version: AdapterVersion) -> AsyncIterator[AcquiredAdapter]:
        """The adapter, accepted by the engine and pinned there until the block exits."""
        started = time.perf_counter()
        vid = version.lora_int_id
        if vid in self._in_engine:
            tier = "engine_hit"
            self._in_engine.move_to_end(vid)
        else:
            if vid in self._rejected:
                raise self._unavailable(version)
            path, tier = await self._ensure_local(version)
            # A task, so a cancelled request cannot leave vLLM and our LRU out of step.
            await asyncio.shield(asyncio.ensure_future(self._load_locked(version, path)))
        self._in_use[vid] += 1  # no await since the check above: eviction cannot interleave
        self._metrics.adapter_loads.labels(tier).inc()
        self._metrics.adapter_load_seconds.labels(tier).observe(time.perf_counter() - started)
        try:
            yield AcquiredAdapter(self._spec(version, self._local_path(version)), tier)
        finally:
            self._in_use[vid] -= 1

    def engine_state(self) -> tuple[list[str], int]:
        """Names of the adapters serving requests now, and the engine's adapter capacity."""
        running = [self._names[v] for v, n in self._in_use.items() if n > 0]
        return sorted(running), self._capacity

    def _spec(self, version: AdapterVersion, path: Path) -> LoraSpec:
        return LoraSpec(name=version.ref, int_id=version.lora_int_id, path=path)

    def _local_path(self, version: AdapterVersion) -> Path:
        return self._cache_dir / version.content_sha256

    async def _ensure_local(self, version: AdapterVersion) -> tuple[Path, str]:
        path = self._local_path(version)
        if path.is_dir():
            return path, "disk_hit"
        # Single flight: concurrent first requests for one version share one download,
        # run as its own task so a cancelled requester cannot fail the others.
        key = version.content_sha256
        task = self._fetches.get(key)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(self._download, version, path))
            self._fetches[key] = task
            # A failure is not cached: the next request after it retries.
            task.add_done_callback(lambda _t: self._fetches.pop(key, None))
        return await asyncio.shield(task), "remote_fetch"

    def _download(self, version: AdapterVersion, path: Path) -> Path:
        tmp = Path(tempfile.mkdtemp(dir=self._cache_dir, prefix=".fetch-"))
        try:
            self._registry.fetch(version, tmp)
            try:
                tmp.rename(path)
            except OSError:
                if not path.is_dir():  # else: an earlier fetch won; _load verifies it
                    raise
        except ArtifactError as exc:
            logger.error("artifact of %s failed verification: %s", version.ref, exc)
            raise AdapterUnavailableError(
                f"adapter {version.ref} cannot be served: its stored artifact failed "
                "sha256 verification; the operator must re-register it"
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("fetched %s into the local cache", version.ref)
        return path

    def _verify_local(self, version: AdapterVersion, path: Path) -> bool:
        return all(
            (path / rel).is_file() and sha256_file(path / rel) == digest
            for rel, digest in version.files.items()
        )

    def _unavailable(self, version: AdapterVersion) -> AdapterUnavailableError:
        return AdapterUnavailableError(
            f"adapter {version.ref} was rejected by the inference engine; "
            "the operator must fix and re-register it")

    async def _load_locked(self, version: AdapterVersion, path: Path) -> None:
        async with self._engine_lock:
            if version.lora_int_id not in self._in_engine:
                await self._load(version, path)

    async def _load(self, version: AdapterVersion, path: Path) -> None:
        """Verify the local copy, make room, and hand it to the engine (engine lock held)."""
        if version.lora_int_id in self._rejected:
            raise self._unavailable(version)
        if not await asyncio.to_thread(self._verify_local, version, path):
            logger.warning("local copy of %s failed verification; fetching again", version.ref)
            await asyncio.to_thread(shutil.rmtree, path, True)
            path, _ = await self._ensure_local(version)
        while len(self._in_engine) >= self._capacity:
            victim = next((v for v in self._in_engine if self._in_use[v] == 0), None)
            if victim is None:
                raise OverloadedError(
                    f"all {self._capacity} adapter slots are serving requests; retry shortly"
                )
            del self._in_engine[victim]
            await self._engine.remove_lora(victim)
            self._metrics.engine_evictions.inc()
        try:
            await self._engine.add_lora(self._spec(version, path))
        except AdapterRejectedError as exc:
            logger.error("engine rejected %s: %s", version.ref, exc)
            self._rejected[version.lora_int_id] = str(exc)
            raise self._unavailable(version) from exc
        self._in_engine[version.lora_int_id] = None
        self._names[version.lora_int_id] = version.ref
        logger.info("engine accepted %s (lora_int_id=%d)", version.ref, version.lora_int_id)
