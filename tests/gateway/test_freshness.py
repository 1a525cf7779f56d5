"""The gateway's TTL caches: one lookup per miss, refreshed ahead, never stale past their
TTL; with a generation watch, entries in use live on without lookups while nothing changes."""

from __future__ import annotations

import asyncio

import pytest

from adapters_registry import DatabaseError, DatabaseUnreachableError
from gateway.tenancy import freshness
from gateway.tenancy.freshness import GenerationWatch, TtlCache


class Source:
    """A lookup whose answers and timing the test controls."""

    def __init__(self) -> None:
        self.calls = 0
        self.value = "v1"
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False

    async def load(self) -> str:
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise LookupError("database down")
        return self.value


def test_concurrent_misses_share_one_lookup() -> None:
    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=60)
        src = Source()
        src.release.clear()
        waiting = [asyncio.create_task(cache.get_or_load("k", src.load)) for _ in range(20)]
        await asyncio.sleep(0)
        src.release.set()
        assert await asyncio.gather(*waiting) == ["v1"] * 20
        assert src.calls == 1

    asyncio.run(main())


def test_hits_in_the_second_half_refresh_in_the_background() -> None:
    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=0.4)
        src = Source()
        assert await cache.get_or_load("k", src.load) == "v1"
        src.value = "v2"
        assert await cache.get_or_load("k", src.load) == "v1"  # young entry: no lookup
        assert src.calls == 1
        await asyncio.sleep(0.25)  # past half its life
        assert await cache.get_or_load("k", src.load) == "v1"  # served now, refreshed behind
        await asyncio.sleep(0.01)
        assert src.calls == 2
        assert await cache.get_or_load("k", src.load) == "v2"

    asyncio.run(main())


def test_a_refresh_that_says_no_ends_the_entry_at_once() -> None:
    """A revoked key (or a deleted name) found by a background refresh is not served on."""
    from gateway.errors import AuthenticationFailedError

    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=0.4)
        calls = 0

        async def load() -> str:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise AuthenticationFailedError("invalid API key")
            return "acme"

        assert await cache.get_or_load("k", load) == "acme"
        await asyncio.sleep(0.25)  # past half its life: this hit refreshes behind
        assert await cache.get_or_load("k", load) == "acme"
        await asyncio.sleep(0.01)
        assert len(cache) == 0
        with pytest.raises(AuthenticationFailedError):
            await cache.get_or_load("k", load)  # well inside the old entry's TTL

    asyncio.run(main())


def test_nothing_is_served_past_its_ttl() -> None:
    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=0.1)
        src = Source()
        await cache.get_or_load("k", src.load)
        src.value = "v2"
        src.release.clear()  # the database is slow now
        await asyncio.sleep(0.15)
        pending = asyncio.create_task(cache.get_or_load("k", src.load))
        await asyncio.sleep(0.02)
        assert not pending.done()  # expired: the caller waits for the lookup, never gets v1
        src.release.set()
        assert await pending == "v2"

    asyncio.run(main())


def test_a_failed_lookup_is_not_cached() -> None:
    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=60)
        src = Source()
        src.fail = True
        with pytest.raises(LookupError):
            await cache.get_or_load("k", src.load)
        src.fail = False
        assert await cache.get_or_load("k", src.load) == "v1"
        assert src.calls == 2

    asyncio.run(main())


class Away(Source):
    """A lookup whose database can be taken away (DatabaseUnreachableError), or refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.error: Exception | None = None

    async def load(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.value


def test_while_the_database_is_away_the_last_answer_is_served_within_the_grace(monkeypatch) -> None:
    monkeypatch.setattr(freshness, "RETRY_WHILE_AWAY_S", 0.05)

    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=0.05, outage_grace=0.4)
        src = Away()
        assert await cache.get_or_load("k", src.load) == "v1"
        await asyncio.sleep(0.06)  # expired
        src.error = DatabaseUnreachableError("database x: it is unreachable")
        assert await cache.get_or_load("k", src.load) == "v1"  # the lookup failed: last answer
        assert cache.registry_away and src.calls == 2
        for _ in range(10):  # away: answered at once, one background lookup per retry period
            assert await cache.get_or_load("k", src.load) == "v1"
        assert src.calls == 2
        await asyncio.sleep(0.06)
        assert await cache.get_or_load("k", src.load) == "v1"
        await asyncio.sleep(0)  # the background lookup runs (and fails)
        assert src.calls == 3
        with pytest.raises(DatabaseUnreachableError):  # never seen: nothing to fall back on
            await cache.get_or_load("other", src.load)
        await asyncio.sleep(0.4)  # past the grace: the outage is the caller's again
        with pytest.raises(DatabaseUnreachableError):
            await cache.get_or_load("k", src.load)
        src.error, src.value = None, "v2"
        assert await cache.get_or_load("k", src.load) == "v2"
        assert not cache.registry_away

    asyncio.run(main())


@pytest.mark.parametrize("error", [DatabaseError("database x: it is read-only"), LookupError("no")])
def test_only_an_unreachable_database_falls_back(error: Exception) -> None:
    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=0.01, outage_grace=60)
        src = Away()
        assert await cache.get_or_load("k", src.load) == "v1"
        await asyncio.sleep(0.02)
        src.error = error
        with pytest.raises(type(error)):
            await cache.get_or_load("k", src.load)

    asyncio.run(main())


def test_without_a_grace_an_away_database_fails_the_lookup() -> None:
    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=0.01)
        src = Away()
        assert await cache.get_or_load("k", src.load) == "v1"
        await asyncio.sleep(0.02)
        src.error = DatabaseUnreachableError("database x: it is unreachable")
        with pytest.raises(DatabaseUnreachableError):
            await cache.get_or_load("k", src.load)

    asyncio.run(main())


def test_zero_ttl_always_looks_up() -> None:
    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=0)
        src = Source()
        for _ in range(3):
            await cache.get_or_load("k", src.load)
        assert src.calls == 3

    asyncio.run(main())


def test_invalidate_where_forgets_exactly_the_entries_it_picks() -> None:
    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=60)
        sources = {k: Source() for k in ("a1", "a2", "b1")}
        for k, src in sources.items():
            await cache.get_or_load(k, src.load)
        assert cache.invalidate_where(lambda key, _: key.startswith("a")) == 2
        assert len(cache) == 1
        for src in sources.values():
            src.value = "v2"
        assert [await cache.get_or_load(k, src.load) for k, src in sources.items()] == [
            "v2", "v2", "v1"]

    asyncio.run(main())


def test_a_lookup_in_flight_when_invalidated_answers_its_callers_but_is_not_cached() -> None:
    # It may have read the database before the change: caching it would keep the stale
    # answer for a whole TTL after the change was announced.
    async def main() -> None:
        cache: TtlCache[str, str] = TtlCache(ttl=60)
        read_before_change = asyncio.Event()

        async def stale() -> str:
            await read_before_change.wait()
            return "v1"

        async def fresh() -> str:
            return "v2"

        early = asyncio.create_task(cache.get_or_load("k", stale))
        await asyncio.sleep(0)
        cache.invalidate_where(lambda *_: False)  # a change elsewhere: nothing cached to drop
        assert await cache.get_or_load("k", fresh) == "v2"  # did not join the early lookup
        read_before_change.set()
        assert await early == "v1"  # its caller gets its answer...
        assert await cache.get_or_load("k", stale) == "v2"  # ...but the cache keeps the fresh one

    asyncio.run(main())


@pytest.mark.parametrize("ref", ["acme", "/bot", "acme/", "ACME/bot", "acme/bot\n"])
def test_malformed_operator_refs_are_clear_errors(registry_env, ref: str) -> None:
    from gateway.errors import InvalidRequestError, ModelNotFoundError
    from gateway.tenancy.directory import TenantDirectory

    directory = TenantDirectory(registry_env.registry, served_base=("x", "y"), ttl=0)
    with pytest.raises((InvalidRequestError, ModelNotFoundError)):
        asyncio.run(directory.resolve_ref(ref))


def test_a_cached_key_is_refused_once_it_expires(tmp_path) -> None:
    """Expiry publishes no change notice: the cache must not accept a key for a TTL past it."""
    from datetime import UTC, datetime, timedelta

    from adapters_registry import Registry
    from gateway.errors import AuthenticationFailedError
    from gateway.tenancy.directory import TenantDirectory

    registry = Registry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "artifacts")
    registry.create_tenant("acme")
    key = registry.create_api_key("acme", expires_at=datetime.now(UTC) + timedelta(seconds=1))
    tenants = TenantDirectory(registry, served_base=("tiny", "r1"), ttl=600)

    async def main() -> None:
        assert (await tenants.authenticate(key)).name == "acme"  # cached for 10 minutes
        await asyncio.sleep(1.2)
        with pytest.raises(AuthenticationFailedError):
            await tenants.authenticate(key)

    try:
        asyncio.run(main())
    finally:
        registry.close()


class Counter:
    """The registry's change counter, as the watch reads it."""

    def __init__(self) -> None:
        self.value = 7
        self.down = False
        self.reads = 0

    def read(self) -> int:
        self.reads += 1
        if self.down:
            raise ConnectionError("database unreachable")
        return self.value


def watched(ttl: float) -> tuple[Counter, GenerationWatch, TtlCache[str, str]]:
    counter = Counter()
    watch = GenerationWatch(counter.read, ttl=ttl)
    return counter, watch, TtlCache(ttl=ttl, watch=watch)


def test_equal_readings_keep_entries_in_use_without_lookups() -> None:
    async def main() -> None:
        counter, watch, cache = watched(ttl=0.3)
        src = Source()
        watch.start()
        try:
            await asyncio.sleep(0.02)  # the first reading: what later ones are compared with
            assert await cache.get_or_load("k", src.load) == "v1"
            for _ in range(60):  # three TTLs of steady use
                assert await cache.get_or_load("k", src.load) == "v1"
                await asyncio.sleep(0.015)
        finally:
            await watch.stop()
        assert src.calls == 1
        assert counter.reads >= 8  # one read per third of a TTL stood in for every lookup

    asyncio.run(main())


def test_a_change_is_served_within_the_ttl_of_when_it_was_counted() -> None:
    async def main() -> None:
        counter, watch, cache = watched(ttl=0.3)
        src = Source()
        watch.start()
        try:
            await asyncio.sleep(0.02)
            await cache.get_or_load("k", src.load)
            await asyncio.sleep(0.2)  # confirmed at least once
            src.value, counter.value = "v2", counter.value + 1
            changed = asyncio.get_running_loop().time()
            served = []
            while asyncio.get_running_loop().time() < changed + 0.5:
                served.append((asyncio.get_running_loop().time() - changed,
                               await cache.get_or_load("k", src.load)))
                await asyncio.sleep(0.01)
        finally:
            await watch.stop()
        assert all(value == "v2" for at, value in served if at > 0.3 + 0.02), served
        assert served[-1][1] == "v2"

    asyncio.run(main())


def test_a_change_between_readings_stops_confirming_what_was_read_before_it() -> None:
    async def main() -> None:
        counter, watch, cache = watched(ttl=60)
        src = Source()
        assert await watch.check() == 0  # the first reading confirms nothing
        await cache.get_or_load("k", src.load)  # read after reading 1
        assert await watch.check() == 1  # reading 2 equals reading 1: confirmed
        assert await watch.check() == 1
        counter.value += 1
        assert await watch.check() == 0  # the generation moved
        assert await watch.check() == 0  # equal again, but the entry was read before the move
        await cache.get_or_load("late", src.load)  # read after the move was seen
        assert await watch.check() == 1  # only the late entry

    asyncio.run(main())


def test_an_unreadable_counter_confirms_nothing_and_the_next_good_reading_picks_up() -> None:
    async def main() -> None:
        counter, watch, cache = watched(ttl=60)
        await watch.check()
        await cache.get_or_load("k", Source().load)
        counter.down = True
        assert await watch.check() == 0
        await cache.get_or_load("k2", Source().load)
        counter.value += 1  # changed while unreadable
        counter.down = False
        assert await watch.check() == 0
        assert await watch.check() == 0  # both were read before the change was seen
        counter.down = True
        await watch.check()
        counter.down = False
        await cache.get_or_load("k3", Source().load)
        assert await watch.check() == 1  # the counter only grows: equal means unchanged

    asyncio.run(main())
