"""Fair admission: weighted per-tenant queues, FIFO switch, bounded queues, deadline, leaving."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from gateway.errors import ClientGoneError, OverloadedError, RateLimitError
from gateway.observability.metrics import GatewayMetrics
from gateway.protection.admission import FairAdmission, Slot


async def _served_order(adm: FairAdmission, arrivals: list[tuple[str, float]]) -> list[str]:
    """Fill the one slot, queue ``arrivals`` in order, then free slots one at a time."""
    first = await adm.acquire("warm-up")
    order: list[str] = []

    async def one(tenant: str, weight: float) -> None:
        slot = await adm.acquire(tenant, weight)
        order.append(tenant)
        await asyncio.sleep(0)
        slot.release()

    tasks = []
    for tenant, weight in arrivals:
        tasks.append(asyncio.create_task(one(tenant, weight)))
        await asyncio.sleep(0)  # enqueued in this order
    first.release()
    await asyncio.gather(*tasks)
    return order


async def test_a_quiet_tenant_is_not_stuck_behind_a_flood() -> None:
    adm = FairAdmission(1, max_queued_per_tenant=100, max_queued=200)
    order = await _served_order(adm, [("flood", 1.0)] * 20 + [("quiet", 1.0)])
    assert order.index("quiet") <= 1, order


async def test_two_backlogged_tenants_alternate() -> None:
    adm = FairAdmission(1, max_queued_per_tenant=100, max_queued=200)
    order = await _served_order(adm, [("a", 1.0)] * 10 + [("b", 1.0)] * 10)
    # After b's first turn, no tenant is served twice in a row while the other waits.
    start = order.index("b")
    assert start <= 1
    tail = order[start:start + 18]
    assert all(x != y for x, y in itertools.pairwise(tail)), order


async def test_weights_share_the_engine() -> None:
    adm = FairAdmission(1, max_queued_per_tenant=100, max_queued=200)
    order = await _served_order(adm, [("heavy", 3.0)] * 30 + [("light", 1.0)] * 30)
    first_forty = order[:40]
    assert first_forty.count("heavy") == pytest.approx(30, abs=2), order


async def test_fifo_when_fairness_is_off() -> None:
    adm = FairAdmission(1, fair=False, max_queued_per_tenant=100, max_queued=200)
    order = await _served_order(adm, [("flood", 1.0)] * 10 + [("quiet", 1.0)])
    assert order == ["flood"] * 10 + ["quiet"]


async def test_capacity_is_never_exceeded() -> None:
    adm = FairAdmission(3, max_queued_per_tenant=100, max_queued=200)
    peak = 0

    async def one(tenant: str) -> None:
        nonlocal peak
        slot = await adm.acquire(tenant)
        peak = max(peak, adm.in_flight)
        await asyncio.sleep(0.001)
        slot.release()

    await asyncio.gather(*(one(f"t{i % 4}") for i in range(40)))
    assert peak == 3 and adm.in_flight == 0 and adm.queued() == 0


async def test_full_queues_are_refused_at_once_with_retry_after() -> None:
    metrics = GatewayMetrics()
    adm = FairAdmission(1, max_queued_per_tenant=2, max_queued=3, metrics=metrics)
    held = await adm.acquire("a")
    waiting = [asyncio.create_task(adm.acquire("a")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(RateLimitError) as per_tenant:
        await adm.acquire("a")
    assert per_tenant.value.status == 429 and per_tenant.value.retry_after is not None
    waiting.append(asyncio.create_task(adm.acquire("b")))
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError) as total:
        await adm.acquire("c")
    assert total.value.status == 503 and "Retry-After" in total.value.headers()
    assert metrics.queue_rejections.labels("a", "tenant_queue_full")._value.get() == 1
    assert metrics.queue_rejections.labels("c", "queue_full")._value.get() == 1
    held.release()
    for granted in asyncio.as_completed(waiting):
        (await granted).release()
    assert adm.in_flight == 0 and adm.queued() == 0


async def test_a_wait_past_the_deadline_is_a_503() -> None:
    adm = FairAdmission(1, deadline_s=0.05)
    held = await adm.acquire("a")
    with pytest.raises(OverloadedError) as exc:
        await adm.acquire("b")
    assert exc.value.retry_after is not None and adm.queued() == 0
    held.release()
    assert adm.in_flight == 0


async def test_a_client_that_disconnects_leaves_the_queue() -> None:
    adm = FairAdmission(1)
    held = await adm.acquire("a")
    gone = asyncio.Event()

    async def disconnected() -> bool:
        return gone.is_set()

    waiter = asyncio.create_task(adm.acquire("b", disconnected=disconnected))
    await asyncio.sleep(0.01)
    assert adm.queued("b") == 1
    gone.set()
    with pytest.raises(ClientGoneError):
        await waiter
    assert adm.queued() == 0
    held.release()
    assert adm.in_flight == 0


async def test_a_cancelled_waiter_hands_its_slot_on() -> None:
    adm = FairAdmission(1)
    held = await adm.acquire("a")
    cancelled = asyncio.create_task(adm.acquire("b"))
    later = asyncio.create_task(adm.acquire("c"))
    await asyncio.sleep(0)
    held.release()  # granted to b, which is cancelled before it runs
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    slot: Slot = await asyncio.wait_for(later, 1)
    slot.release()
    slot.release()  # idempotent
    assert adm.in_flight == 0 and adm.queued() == 0


async def test_reserved_slots_start_a_quiet_tenant_at_once() -> None:
    adm = FairAdmission(4, reserve=1)
    (await adm.acquire("quiet")).release()  # a neighbour: from now on the reserve holds
    flood = [await adm.acquire("flood") for _ in range(3)]
    queued = asyncio.create_task(adm.acquire("flood"))
    await asyncio.sleep(0)
    assert adm.in_flight == 3 and adm.queued("flood") == 1  # the last slot is kept back
    quiet = await asyncio.wait_for(adm.acquire("quiet"), 0.1)
    assert adm.in_flight == 4
    quiet.release()
    assert not queued.done()  # still reserved: flood has requests in flight
    flood.pop().release()
    (await asyncio.wait_for(queued, 1)).release()
    for slot in flood:
        slot.release()
    assert adm.in_flight == 0 and adm.queued() == 0


async def test_a_tenant_alone_gets_every_slot_and_the_reserve_holds_once_it_has_a_neighbour(
        ) -> None:
    adm = FairAdmission(4, reserve=1, reserve_window_s=0.2)
    alone = [await asyncio.wait_for(adm.acquire("flood"), 1) for _ in range(4)]
    assert adm.in_flight == 4  # nobody to keep the reserve for
    quiet = asyncio.create_task(adm.acquire("quiet"))  # the first neighbour waits for a slot
    alone.pop().release()
    (await asyncio.wait_for(quiet, 1)).release()
    queued = asyncio.create_task(adm.acquire("flood"))
    await asyncio.sleep(0)
    assert not queued.done() and adm.in_flight == 3  # the reserve holds for the neighbour
    await asyncio.sleep(0.3)  # the neighbour has been idle longer than the window
    alone.pop().release()  # a release dispatches: the flood may take every slot again
    alone.append(await asyncio.wait_for(queued, 1))
    alone.append(await asyncio.wait_for(adm.acquire("flood"), 1))
    assert adm.in_flight == 4
    for slot in alone:
        slot.release()
    assert adm.in_flight == 0 and adm.queued() == 0


async def test_tenants_are_compared_in_tokens_not_requests() -> None:
    """Both tenants backlogged; ``long``'s requests process 10x the tokens: it gets about a
    tenth of the admissions while both wait (virtual token counters)."""
    adm = FairAdmission(1, max_queued_per_tenant=100, max_queued=200)
    first = await adm.acquire("warm-up")
    order: list[str] = []

    async def one(tenant: str, tokens: int) -> None:
        slot = await adm.acquire(tenant)
        order.append(tenant)
        slot.charge(tokens)
        await asyncio.sleep(0)
        slot.release()

    tasks = []
    for _ in range(40):
        tasks.append(asyncio.create_task(one("long", 1000)))
        tasks.append(asyncio.create_task(one("short", 100)))
        await asyncio.sleep(0)
    first.release()
    await asyncio.gather(*tasks)
    while_both_wait = order[:44]
    assert while_both_wait.count("short") == pytest.approx(40, abs=2), order


async def test_slots_carry_the_engine_priority_of_their_tenants_share() -> None:
    from gateway.protection.fair_share import FairShare

    adm = FairAdmission(8, share=FairShare(slack=8))
    assert (await adm.acquire("x")).priority is not None
    assert (await FairAdmission(8).acquire("x")).priority is None
    flood = [await adm.acquire("flood") for _ in range(3)]
    for slot in flood:
        slot.charge(500)
    later_flood = await adm.acquire("flood")
    quiet = await adm.acquire("quiet")
    assert quiet.priority < later_flood.priority


async def _admitted_adapters(adm: FairAdmission, running: str, waiting: list[str]) -> list[str]:
    """One slot held by a request for ``running``; ``waiting`` queued in order (one tenant),
    then the slot freed one request at a time (each still-running adapter keeps a request
    in flight through a second slot)."""
    hold = await adm.acquire("t", adapter=running)
    keep = await adm.acquire("t", adapter=running)  # the running adapter stays running
    order: list[str] = []

    async def one(adapter: str) -> None:
        slot = await adm.acquire("t", adapter=adapter)
        order.append(adapter)
        slot.release()

    tasks = []
    for adapter in waiting:
        tasks.append(asyncio.create_task(one(adapter)))
        await asyncio.sleep(0)
    hold.release()
    await asyncio.gather(*tasks)
    keep.release()
    return order


async def test_a_request_for_a_running_adapter_goes_first_among_equals() -> None:
    adm = FairAdmission(2, max_queued_per_tenant=100, max_queued=200)
    order = await _admitted_adapters(adm, "hot", ["cold-1", "cold-2", "hot", "hot"])
    assert order[:2] == ["hot", "hot"], order
    assert sorted(order[2:]) == ["cold-1", "cold-2"]


async def test_no_adapter_waits_past_the_affinity_deadline() -> None:
    adm = FairAdmission(2, max_queued_per_tenant=100, max_queued=200, adapter_affinity_holds=0.0)
    order = await _admitted_adapters(adm, "hot", ["cold-1", "cold-2", "hot", "hot"])
    assert order == ["cold-1", "cold-2", "hot", "hot"]


async def test_a_request_for_a_running_adapter_goes_first_and_a_free_adapter_slot_in_turn() -> None:
    adm = FairAdmission(2, max_queued_per_tenant=100, max_queued=200, adapter_slots=2)
    order = await _admitted_adapters(adm, "hot", ["cold-1", "cold-2", "cold-2", "hot"])
    assert order == ["hot", "cold-1", "cold-2", "cold-2"], order


async def test_a_request_that_cannot_join_the_batch_waits_here_not_in_the_engine() -> None:
    adm = FairAdmission(4, max_queued_per_tenant=100, max_queued=200, adapter_slots=1)
    hot = await adm.acquire("t", adapter="hot")
    cold = asyncio.create_task(adm.acquire("t", adapter="cold"))
    await asyncio.sleep(0.01)
    assert not cold.done() and adm.in_flight == 1  # three slots free, but no adapter slot
    also_hot = await adm.acquire("t", adapter="hot")  # joins the running batch at once
    base = await adm.acquire("t")  # the base needs no adapter slot
    also_hot.release()
    hot.release()
    (await cold).release()
    base.release()
    assert adm.in_flight == 0


@pytest.mark.parametrize("waited_too_long", [False, True])
async def test_a_busy_adapter_cannot_keep_another_out_past_the_deadline(waited_too_long: bool) -> None:
    """The only adapter slot is taken by an adapter whose requests keep coming. Before the
    deadline they join its batch; once another adapter's request has waited past it, no
    more of them are let in, so the slot frees for it when those in flight leave."""
    adm = FairAdmission(2, max_queued_per_tenant=100, max_queued=200, adapter_slots=1,
                        adapter_affinity_holds=1.0 if waited_too_long else 1000.0)
    adm._hold_s = 0.01  # the mean time a request holds its slot: the deadline is 10 ms
    first, second = await adm.acquire("t", adapter="hot"), await adm.acquire("t", adapter="hot")
    cold = asyncio.create_task(adm.acquire("t", adapter="cold"))
    await asyncio.sleep(0)
    hot = [asyncio.create_task(adm.acquire("t", adapter="hot")) for _ in range(3)]
    await asyncio.sleep(0.05)
    first.release()
    await asyncio.sleep(0.01)
    assert hot[0].done() is not waited_too_long
    assert not cold.done()
    second.release()
    await asyncio.sleep(0.01)
    assert cold.done() is waited_too_long
    tasks = [cold, *hot]
    while not all(task.done() for task in tasks):  # each admitted one leaves, handing its slot on
        for task in tasks:
            if task.done():
                task.result().release()
        await asyncio.sleep(0.001)
    for task in tasks:
        task.result().release()
    assert adm.in_flight == 0 and adm.queued() == 0
