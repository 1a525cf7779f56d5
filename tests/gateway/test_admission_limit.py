"""The admission limit under a latency target: down when TPOT is over it, up when under."""

from __future__ import annotations

import asyncio

import pytest

from gateway.protection.admission import FairAdmission
from gateway.protection.admission_limit import LatencyTarget
from tests.gateway.fakes import Clock


def test_over_the_target_the_limit_shrinks_to_its_floor_and_no_further() -> None:
    clock = Clock()
    target = LatencyTarget(0.05, ceiling=16, floor=2, cooldown_s=1.0, clock=clock)
    limits = []
    for _ in range(10):
        clock.now += 1.0
        target.observe(0.2, saturated=True)
        limits.append(target.limit)
    assert limits[:3] == [12, 9, 6] and limits[-1] == 2


def test_under_the_target_it_grows_only_while_requests_wait() -> None:
    clock = Clock()
    target = LatencyTarget(0.05, ceiling=16, floor=2, clock=clock)
    target.limit = 4
    for _ in range(5):
        clock.now += 1.0
        target.observe(0.01, saturated=False)
    assert target.limit == 4  # nobody waits: a larger batch would buy nothing
    for _ in range(5):
        clock.now += 1.0
        target.observe(0.01, saturated=True)
    assert target.limit == 9


def test_one_change_per_cooldown() -> None:
    clock = Clock()
    target = LatencyTarget(0.05, ceiling=16, cooldown_s=1.0, clock=clock)
    for _ in range(20):
        target.observe(0.5, saturated=True)  # all at once: the first change has not shown yet
    assert target.limit == 12


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LatencyTarget(0.0, ceiling=4)
    with pytest.raises(ValueError):
        LatencyTarget(0.05, ceiling=4, floor=5)
    with pytest.raises(ValueError, match="reserved"):
        FairAdmission(8, reserve=1, latency_target=LatencyTarget(0.05, ceiling=8, floor=1))


async def test_slow_tokens_hold_requests_at_the_door() -> None:
    target = LatencyTarget(0.001, ceiling=4, floor=1, cooldown_s=0.0)
    adm = FairAdmission(4, latency_target=target, max_queued_per_tenant=100, max_queued=200)
    slots = [await adm.acquire("t") for _ in range(4)]
    waiting = [asyncio.create_task(adm.acquire("t")) for _ in range(4)]
    await asyncio.sleep(0)
    for slot in slots[:2]:
        slot.generated(1)
        await asyncio.sleep(0.01)
        slot.generated(1)  # 10 ms per token: ten times the target
        slot.release()
    await asyncio.sleep(0)
    assert adm.limit < 4
    assert adm.in_flight <= adm.limit
    assert sum(t.done() for t in waiting) < 2  # freed slots did not all go to the queue
    for slot in slots[2:]:
        slot.release()
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_under_a_small_limit_one_slot_stays_reserved_and_the_busy_tenant_keeps_the_rest() -> None:
    target = LatencyTarget(0.05, ceiling=16, floor=2)
    target.limit = 4
    adm = FairAdmission(16, reserve=2, latency_target=target, max_queued_per_tenant=100,
                        max_queued=200)
    await adm.acquire("quiet")  # a neighbour: the reserve holds
    busy = [asyncio.create_task(adm.acquire("flood")) for _ in range(6)]
    await asyncio.sleep(0)
    assert sum(t.done() for t in busy) == 2  # 4 - the quiet one's - 1 reserved
    quiet_again = await asyncio.wait_for(adm.acquire("newcomer"), 1)  # the reserved slot
    assert quiet_again is not None and adm.in_flight == 4
    for task in busy:
        task.cancel()
    await asyncio.gather(*busy, return_exceptions=True)
