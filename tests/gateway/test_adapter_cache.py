"""The adapter tiers: single-flight fetch, disk LRU by bytes, pins, prefetch, eviction.

AdapterManager runs on the real registry (tiny adapters) and the fake engine, which
fails the test if generate() ever sees an adapter add_lora did not accept.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from adapters_registry.errors import ArtifactError
from gateway.errors import (
    AdapterUnavailableError,
    CacheConflictError,
    ModelNotFoundError,
    OverloadedError,
)
from gateway.observability.metrics import GatewayMetrics
from gateway.residency.disk_cache import DiskCache
from gateway.residency.manager import AdapterManager
from gateway.tenancy.directory import TenantDirectory
from tests.conftest import copy_adapter
from tests.gateway.conftest import Gateway
from tests.gateway.fakes import FakeEngine

ADMIN_KEY = "a" * 40


class Env:
    def __init__(self, registry_env, tmp_path: Path, *, engine_capacity: int = 4,
                 disk_bytes: int = 1 << 30, load_concurrency: int = 8,
                 slot_wait_s: float = 0.0) -> None:
        self.reg = registry_env.registry
        self.engine = FakeEngine()
        self.engine.capacity = engine_capacity
        self.fetch_gate: threading.Barrier | None = None
        self.metrics = GatewayMetrics()
        self.fetches: list[str] = []
        self.fail_fetches = 0
        original = self.reg.fetch

        def counting_fetch(version, dest):
            self.fetches.append(version.ref)
            if self.fetch_gate is not None:
                self.fetch_gate.wait()  # in a worker thread: passes only when downloads overlap
            if self.fail_fetches:
                self.fail_fetches -= 1
                raise ArtifactError("store unreachable (injected)")
            original(version, dest)

        self.reg.fetch = counting_fetch
        self.cache_dir = tmp_path / "cache"
        self.disk = DiskCache(self.cache_dir, disk_bytes)
        contract = registry_env.contract
        self.manager = AdapterManager(self.reg, self.engine, self.disk, self.metrics,
                                      engine_capacity=engine_capacity, slot_capacity=1,
                                      load_concurrency=load_concurrency, slot_wait_s=slot_wait_s)
        self.tenants = TenantDirectory(self.reg, served_base=(contract.model_id, contract.revision),
                                       ttl=0)

    def version(self, tenant: str, model: str):
        return self.reg.resolve(self.reg.get_tenant(tenant), model)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


async def tier_of(manager: AdapterManager, version) -> str:
    async with manager.use(version) as acquired:
        return acquired.tier


@pytest.fixture
def env(registry_env, tmp_path) -> Env:
    return Env(registry_env, tmp_path)


def test_tiers_in_order_slot_engine_disk_remote(env: Env) -> None:
    acme, globex = env.version("acme", "support-bot"), env.version("globex", "pirate")

    async def main() -> list[str]:
        seen = [await tier_of(env.manager, acme), await tier_of(env.manager, acme)]
        seen.append(await tier_of(env.manager, globex))  # takes the one slot
        seen.append(await tier_of(env.manager, acme))  # in engine memory, not in the slot
        await env.manager.evict(acme, "engine")
        seen.append(await tier_of(env.manager, acme))  # from disk
        return seen

    assert asyncio.run(main()) == ["remote_fetch", "slot_hit", "remote_fetch", "engine_hit", "disk_hit"]
    assert env.fetches == [acme.ref, globex.ref]
    assert env.metric("lgw_adapter_cache_evictions_total", cache="engine") == 1
    assert env.metric("lgw_adapter_cache_hits_total", cache="disk") == 1
    assert env.metric("lgw_adapter_requests_total", tier="engine_hit") == 1


def test_failed_fetch_is_not_cached(env: Env) -> None:
    version = env.version("acme", "support-bot")
    env.fail_fetches = 1

    async def main() -> str:
        with pytest.raises(AdapterUnavailableError, match="could not be fetched"):
            await tier_of(env.manager, version)
        return await tier_of(env.manager, version)

    assert asyncio.run(main()) == "remote_fetch"
    assert env.fetches == [version.ref, version.ref]
    assert env.engine.add_calls == [version.lora_int_id]
    assert [p.name for p in env.cache_dir.iterdir()] == [version.content_sha256]  # no partial folder


def test_engine_never_evicts_an_adapter_in_use(registry_env, tmp_path) -> None:
    env = Env(registry_env, tmp_path, engine_capacity=1)
    acme, globex = env.version("acme", "support-bot"), env.version("globex", "pirate")

    async def main() -> None:
        async with env.manager.use(acme):
            with pytest.raises(OverloadedError):
                await tier_of(env.manager, globex)
            assert acme.lora_int_id in env.engine.loaded
        assert await tier_of(env.manager, globex) == "disk_hit"  # fetched before the refusal
        assert env.engine.removed == [acme.lora_int_id]

    asyncio.run(main())


def test_a_full_engine_makes_a_new_adapter_wait_for_a_slot_not_fail(registry_env, tmp_path) -> None:
    """With ``slot_wait_s``, a request for an adapter that finds every slot serving
    requests waits until one is released (then evicts it, idle), instead of a 503; past the
    wait it is still refused, and nothing in use is ever removed."""
    env = Env(registry_env, tmp_path, engine_capacity=1, slot_wait_s=5.0)
    acme, globex = env.version("acme", "support-bot"), env.version("globex", "pirate")

    async def main() -> None:
        release = asyncio.Event()

        async def hold() -> None:
            async with env.manager.use(acme):
                await release.wait()
                assert env.engine.removed == []  # never from under a request

        holder = asyncio.create_task(hold())
        while acme.lora_int_id not in env.engine.loaded:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(tier_of(env.manager, globex))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # neither refused nor loaded while acme serves
        started = time.monotonic()
        release.set()
        await holder
        assert await waiting == "remote_fetch"
        assert time.monotonic() - started < 1.0  # woken by the release, not by the wait's end
        assert env.engine.removed == [acme.lora_int_id]

        env.manager._slot_wait_s = 0.2
        async with env.manager.use(globex):
            started = time.monotonic()
            with pytest.raises(OverloadedError, match="adapter slots are serving requests"):
                await tier_of(env.manager, acme)
            assert 0.2 <= time.monotonic() - started < 2.0
            assert globex.lora_int_id in env.engine.loaded

    asyncio.run(main())


def test_disk_lru_by_bytes_keeps_what_is_in_use(registry_env, tmp_path) -> None:
    env = Env(registry_env, tmp_path, engine_capacity=1, disk_bytes=1 << 20)
    acme, globex = env.version("acme", "support-bot"), env.version("globex", "pirate")

    async def main() -> None:
        await tier_of(env.manager, acme)
        one = env.disk.total_bytes
        assert one > 0
        env.disk.max_bytes = one + one // 2  # room for one adapter folder, not two
        async with env.manager.use(acme):
            # acme is in use: globex's fetch must not evict it; with engine capacity 1 the
            # load itself is refused, but the download has landed.
            with pytest.raises(OverloadedError):
                await tier_of(env.manager, globex)
            assert acme.content_sha256 in env.disk and globex.content_sha256 in env.disk
        # acme idle: serving globex removes acme from the engine, then disk space can be freed.
        assert await tier_of(env.manager, globex) == "disk_hit"
        await env.manager.prefetch(acme, "disk")  # touches it; nothing evicted while over
        assert env.disk.shrink(env.manager._protected_shas()) != []
        assert env.disk.total_bytes <= env.disk.max_bytes
        assert globex.content_sha256 in env.disk  # in engine memory: protected
        assert acme.content_sha256 not in env.disk

    asyncio.run(main())
    assert env.metric("lgw_adapter_disk_cache_bytes") > 0


def test_disk_cache_survives_a_restart_in_lru_order(registry_env, tmp_path) -> None:
    env = Env(registry_env, tmp_path)
    acme, globex = env.version("acme", "support-bot"), env.version("globex", "pirate")

    async def warm() -> None:
        await tier_of(env.manager, globex)
        await tier_of(env.manager, acme)

    asyncio.run(warm())
    old = os.path.getmtime(env.disk.path(acme.content_sha256)) - 100
    os.utime(env.disk.path(acme.content_sha256), (old, old))  # acme is now the older one
    (env.cache_dir / ".fetch-crashed").mkdir()  # a download a crash interrupted
    reborn = DiskCache(env.cache_dir, env.disk.total_bytes)
    assert len(reborn) == 2 and not (env.cache_dir / ".fetch-crashed").exists()
    reborn.max_bytes = reborn.total_bytes - 1
    evicted = reborn.shrink(set())
    assert [e.sha for e in evicted] == [acme.content_sha256]

    again = Env(registry_env, tmp_path)  # a new gateway process on the same folder
    assert asyncio.run(tier_of(again.manager, globex)) == "disk_hit"
    assert again.fetches == []


def test_pinned_adapter_is_never_evicted(registry_env, tmp_path) -> None:
    env = Env(registry_env, tmp_path, engine_capacity=2)
    acme, globex = env.version("acme", "support-bot"), env.version("globex", "pirate")

    async def main() -> None:
        assert await env.manager.pin(acme) == "remote_fetch"
        for _ in range(3):  # globex and a second acme version compete for the free slot
            assert await tier_of(env.manager, globex) in {"remote_fetch", "disk_hit", "slot_hit"}
        with pytest.raises(CacheConflictError, match="pinned"):
            await env.manager.evict(acme, "all")
        with pytest.raises(CacheConflictError, match="at least one must stay free"):
            await env.manager.pin(globex)
        assert await tier_of(env.manager, acme) in {"slot_hit", "engine_hit"}
        assert env.manager.unpin(acme)
        assert await env.manager.evict(acme, "all") == ["engine", "disk"]

    asyncio.run(main())
    assert acme.lora_int_id not in env.engine.loaded
    assert env.engine.add_calls.count(acme.lora_int_id) == 1


def test_evict_refuses_an_adapter_in_use(env: Env) -> None:
    acme = env.version("acme", "support-bot")

    async def main() -> None:
        async with env.manager.use(acme):
            with pytest.raises(CacheConflictError, match="serving requests"):
                await env.manager.evict(acme, "engine")
        with pytest.raises(CacheConflictError, match="held by the engine"):
            await env.manager.evict(acme, "disk")  # still in engine memory

    asyncio.run(main())


# -- through the gateway's admin API and settings --------------------------------------


def admin(gw: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_admin_prefetch_pin_evict_and_state(gateway_factory) -> None:
    gw = gateway_factory(admin_api_key=ADMIN_KEY, max_cpu_loras=3, max_loras=1)
    r = gw.client.post("/admin/v1/cache/prefetch", headers=admin(gw),
                       json={"adapters": ["acme/support-bot", "globex/pirate:prod", "acme/nope",
                                          "bad-ref"], "into": "engine"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["failed"] == 2
    by_ref = {d["adapter"]: d for d in body["data"]}
    assert by_ref["acme/support-bot"]["was"] == "remote_fetch"
    assert by_ref["acme/nope"]["error"]["code"] == "model_not_found"
    assert by_ref["bad-ref"]["error"]["param"] == "adapter"
    # A tenant's first request after prefetch is served from engine memory.
    assert gw.chat("acme", "support-bot").headers["x-lora-gateway-adapter-tier"] in {"slot_hit",
                                                                                     "engine_hit"}
    assert gw.client.post("/admin/v1/cache/pin", headers=admin(gw),
                          json={"adapter": "acme/support-bot@v1"}).json()["pinned"] is True
    r = gw.client.post("/admin/v1/cache/evict", headers=admin(gw),
                       json={"adapter": "acme/support-bot", "from": "all"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    r = gw.client.post("/admin/v1/cache/evict", headers=admin(gw),
                       json={"adapter": "globex/pirate", "from": "all"})
    assert r.json()["evicted_from"] == ["engine", "disk"], r.text
    state = gw.client.get("/admin/v1/cache", headers=admin(gw)).json()
    assert state["pinned"] == ["acme/support-bot@v1"]
    assert [a["adapter"] for a in state["engine"]["adapters"]] == ["acme/support-bot@v1"]
    assert state["disk"]["folders"] == 1
    assert gw.chat("globex", "pirate").headers["x-lora-gateway-adapter-tier"] == "remote_fetch"
    bad = gw.client.post("/admin/v1/cache/evict", headers=admin(gw),
                         json={"adapter": "globex/pirate", "from": "gpu"})
    assert bad.status_code == 400
    assert gw.client.get("/admin/v1/cache", headers=gw.headers("acme")).status_code == 401


def test_pins_and_prefetch_from_settings_at_start(gateway_factory) -> None:
    gw = gateway_factory(admin_api_key=ADMIN_KEY, max_cpu_loras=3, max_loras=1,
                         pinned_adapters=["acme/support-bot"],
                         prefetch_adapters=["globex/pirate", "globex/missing"])
    assert len(gw.engine.loaded) == 2  # loaded before the first request
    state = gw.client.get("/admin/v1/cache", headers=admin(gw)).json()
    assert state["pinned"] == ["acme/support-bot@v1"]
    assert "does not exist" in state["warmup_errors"]["globex/missing"]
    assert gw.chat("globex", "pirate").headers["x-lora-gateway-adapter-tier"] in {"slot_hit",
                                                                                  "engine_hit"}


def test_too_many_pins_is_a_settings_error(registry_env, tmp_path) -> None:
    from pydantic import ValidationError

    from tests.gateway.conftest import make_settings

    with pytest.raises(ValidationError, match="one engine slot must stay free"):
        make_settings(registry_env, tmp_path, max_cpu_loras=2, max_loras=1,
                      pinned_adapters=["acme/support-bot", "globex/pirate"])


def test_unknown_ref_is_not_found(env: Env) -> None:
    with pytest.raises(ModelNotFoundError):
        asyncio.run(env.tenants.resolve_ref("nobody/support-bot"))


def test_a_second_version_with_identical_files_shares_the_folder(env: Env, registry_env,
                                                                 trained_adapters, tmp_path) -> None:
    same = copy_adapter(trained_adapters["acme"], tmp_path / "same")
    shutil.rmtree(same / "unused", ignore_errors=True)
    v2 = registry_env.registry.push("acme", "support-bot-copy", same)
    v1 = env.version("acme", "support-bot")
    assert v2.content_sha256 == v1.content_sha256

    async def main() -> list[str]:
        return [await tier_of(env.manager, v1), await tier_of(env.manager, v2)]

    assert asyncio.run(main()) == ["remote_fetch", "disk_hit"]
    assert env.fetches == [v1.ref]
