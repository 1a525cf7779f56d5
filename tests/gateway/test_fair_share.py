"""The engine priority a request carries: its tenant's fair share in tokens, never starving."""

from __future__ import annotations

import random

import pytest

from gateway.protection.fair_share import FairShare
from tests.gateway.fakes import Clock


def test_a_light_tenant_goes_ahead_of_a_heavy_tenants_waiting_requests() -> None:
    share = FairShare(slack=16, clock=Clock())
    share.charge("quiet", 40)
    share.charge("flood", 2000)
    flood = [share.priority("flood") for _ in range(8)]  # waiting in the engine
    quiet = share.priority("quiet")
    assert quiet < min(flood), (quiet, flood)


def test_a_tenant_alone_keeps_its_own_order() -> None:
    share = FairShare(slack=16, clock=Clock())
    priorities = []
    for _ in range(50):
        priorities.append(share.priority("alone"))
        share.charge("alone", 100)
    assert priorities == sorted(priorities) and len(set(priorities)) == 50


def test_equal_tenants_are_equal_and_weights_count() -> None:
    share = FairShare(slack=100, clock=Clock())
    share.charge("a", 500)
    share.charge("b", 500)
    assert share.share("a") == pytest.approx(0.5)
    share.charge("heavy", 2000, weight=4.0)  # 4x the weight: 2000 tokens count as 500
    assert share.share("heavy") == pytest.approx(share.share("a"))


def test_usage_decays_with_the_half_life() -> None:
    clock = Clock()
    share = FairShare(slack=16, half_life_s=10.0, clock=clock)
    share.charge("old", 1000)
    clock.now = 20.0  # two half-lives: 250 left
    share.charge("new", 250)
    assert share.share("old") == pytest.approx(0.5)
    clock.now = 1e6
    share.forget_idle()
    assert share.share("old") == 0.0


def test_no_request_is_passed_by_more_than_slack_later_ones() -> None:
    """Starvation bound: whatever the tenants' standing, a request admitted as number n is
    passed in the engine's queue (lower priority first, then arrival) by at most ``slack``
    requests admitted after it: every request after n + slack has a larger priority."""
    rng = random.Random(7)
    slack = 12
    share = FairShare(slack=slack, clock=Clock())
    share.charge("heavy", 10**6)  # the worst standing there is: share ~1
    victim_number, victim = 1, share.priority("heavy")
    passed_by = 0
    for number in range(2, 400):
        # A stream of newcomers and light tenants, all with share ~0, plus some heavy traffic.
        tenant = rng.choice(["heavy", "light"] + [f"new-{number}"] * 3)
        priority = share.priority(tenant)
        share.charge(tenant, rng.randint(1, 50))
        if priority < victim:
            passed_by += 1
            assert number <= victim_number + slack
    assert 0 < passed_by <= slack
