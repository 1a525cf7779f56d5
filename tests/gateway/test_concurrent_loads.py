"""Concurrent loads: one flight per version, loads of different versions in parallel.

Vendor races these guard against: Dynamo #5184 (concurrent first requests for one LoRA
each loaded it) and a global load lock that made every cold load wait for the others.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from safetensors.numpy import load_file, save_file

from gateway.errors import OverloadedError
from tests.conftest import copy_adapter
from tests.gateway.test_adapter_cache import Env, tier_of


@pytest.fixture
def env(registry_env, tmp_path) -> Env:
    return Env(registry_env, tmp_path)


def test_concurrent_first_requests_fetch_and_load_once(env: Env) -> None:
    version = env.version("acme", "support-bot")

    async def main() -> list[str]:
        return await asyncio.gather(*[tier_of(env.manager, version) for _ in range(8)])

    tiers = asyncio.run(main())
    assert env.fetches == [version.ref]
    assert env.engine.add_calls == [version.lora_int_id]
    assert tiers.count("remote_fetch") == 8  # all of them waited on the one download
    assert env.metric("lgw_adapter_cache_loads_total", cache="disk") == 1


def _two_versions(env: Env) -> list:
    return [env.version("acme", "support-bot"), env.version("globex", "pirate")]


def test_cold_loads_of_different_versions_overlap(env: Env) -> None:
    """Two first requests download at the same time and are in add_lora at the same time.

    Each gate lets a caller through only once both are waiting at it: with loads
    serialised behind one lock, the first would wait for the second forever (timeout).
    """
    env.fetch_gate = threading.Barrier(2, timeout=10)
    both_adding = asyncio.Barrier(2)

    async def add_gate() -> None:
        await asyncio.wait_for(both_adding.wait(), timeout=10)

    env.engine.add_gate = add_gate

    async def main() -> list[str]:
        return list(await asyncio.gather(*[tier_of(env.manager, v) for v in _two_versions(env)]))

    assert asyncio.run(main()) == ["remote_fetch", "remote_fetch"]
    assert sorted(env.engine.loaded) == sorted(v.lora_int_id for v in _two_versions(env))


def test_load_concurrency_one_serialises_cold_loads(registry_env, tmp_path) -> None:
    env = Env(registry_env, tmp_path, load_concurrency=1)
    in_add, most = 0, 0

    async def add_gate() -> None:
        nonlocal in_add, most
        in_add += 1
        most = max(most, in_add)
        await asyncio.sleep(0.05)  # room for a second load to overlap, if anything allowed it
        in_add -= 1

    env.engine.add_gate = add_gate

    async def main() -> None:
        await asyncio.gather(*[tier_of(env.manager, v) for v in _two_versions(env)])

    asyncio.run(main())
    assert most == 1 and len(env.engine.add_calls) == 2


def test_parallel_loads_never_overfill_the_engine(registry_env, trained_adapters, tmp_path) -> None:
    """Capacity 2 with one adapter in use: of two concurrent cold loads one is refused.

    Reserving a slot counts loads under way, so the engine never holds three; once the
    held adapter is idle it is the victim and the refused load goes through.
    """
    env = Env(registry_env, tmp_path, engine_capacity=2)
    acme, globex = _two_versions(env)
    other = registry_env.registry.push("acme", "other", copy_adapter(trained_adapters["globex"],
                                                                     tmp_path / "other"))

    async def main() -> tuple[list[object], str]:
        async with env.manager.use(acme):
            results = await asyncio.gather(tier_of(env.manager, globex), tier_of(env.manager, other),
                                           return_exceptions=True)
        refused = other if isinstance(results[1], OverloadedError) else globex
        return results, await tier_of(env.manager, refused)

    results, later = asyncio.run(main())
    assert sorted(type(r).__name__ for r in results) == ["OverloadedError", "str"], results
    assert later in ("disk_hit", "remote_fetch")
    assert acme.lora_int_id not in env.engine.loaded and len(env.engine.loaded) == 2


def test_a_request_arriving_as_a_load_ends_is_a_slot_hit(env: Env) -> None:
    """The load takes the slot for its waiters before they resume (CI saw ``engine_hit``).

    The test awaits the load task itself, so it runs after the load and before the first
    request that started it resumes; a request made then finds the adapter batched.
    """
    version = env.version("acme", "support-bot")
    vid = version.lora_int_id

    async def main() -> list[str]:
        first = asyncio.create_task(tier_of(env.manager, version))
        while vid not in env.manager._loads:
            await asyncio.sleep(0)
        await env.manager._loads[vid]
        assert not first.done()  # still waiting to resume: this is the window
        late = await tier_of(env.manager, version)
        return [await first, late]

    assert asyncio.run(main()) == ["remote_fetch", "slot_hit"]
    assert env.metric("lgw_adapter_cache_loads_total", cache="slot") == 1


def test_a_load_waiting_for_a_slot_lets_other_adapters_download(registry_env, trained_adapters,
                                                                  tmp_path) -> None:
    """One load permit, one engine slot, held by a request: the next adapter's load waits
    for the slot without holding the permit, so a third adapter still downloads meanwhile
    (with the permit held through the wait, its download waited for the release)."""
    env = Env(registry_env, tmp_path, engine_capacity=1, load_concurrency=1, slot_wait_s=10.0)
    acme, globex = _two_versions(env)
    folder = copy_adapter(trained_adapters["globex"], tmp_path / "other")
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({k: v * 0.5 for k, v in weights.items()}, folder / "adapter_model.safetensors",
              metadata={"format": "pt"})  # other bytes: its own download
    other = registry_env.registry.push("acme", "other", folder)
    assert other.content_sha256 != globex.content_sha256

    async def main() -> list[str]:
        release = asyncio.Event()

        async def hold() -> None:
            async with env.manager.use(acme):
                await release.wait()

        holder = asyncio.create_task(hold())
        while acme.lora_int_id not in env.engine.loaded:
            await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(tier_of(env.manager, v)) for v in (globex, other)]
        for _ in range(500):  # both downloads done while acme still holds the only slot
            if all(env.disk.lookup(v.content_sha256) for v in (globex, other)):
                break
            await asyncio.sleep(0.01)
        on_disk = [bool(env.disk.lookup(v.content_sha256)) for v in (globex, other)]
        assert not any(w.done() for w in waiting)  # neither loaded nor refused yet
        release.set()
        await holder
        tiers = [await w for w in waiting[:1]]  # the first waiter takes the slot ...
        waiting[1].cancel()  # ... the second would wait for it in turn
        assert on_disk == [True, True], on_disk
        return tiers

    assert asyncio.run(main()) == ["remote_fetch"]
