"""Each tenant's standing in tokens, and the engine priority a request takes from it.

The door (``gateway.protection.admission``) orders the requests that wait for an engine slot; once
admitted, a request waits again inside the engine (vLLM queues what it cannot batch yet,
first come, first served by default). With vLLM's ``priority`` scheduling policy the
engine serves its waiting queue by ``(priority, arrival)``, lowest first, and when it runs
short of KV cache it preempts the running request with the highest. This module gives
each request its priority:

    priority = admission number + round(slack * share)

``share`` is the tenant's part of the engine's recent work: its tokens (prompt and
completion, as the engine produces them) per unit of its weight, decayed with a
half-life, over all tenants' (the classic fair-share scheduler's decayed usage; the
tokens-not-requests accounting of Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024). A tenant that used little has a share near 0 and its request goes
ahead of up to ``slack`` requests admitted before it from tenants that used much; a
tenant alone has share 1 on every request, so its own requests keep their order.

Why not the virtual token counters themselves: a vLLM priority is fixed when the request
enters the engine, while counters are relative to whoever is active at that moment. A
counter lifted to the busy tenant's (as VTC does for a tenant that was idle) ties the
quiet tenant with requests the busy tenant queued earlier, and it goes behind all of them.

No starvation: a request admitted as number ``n`` has priority at most ``n + slack``,
and every request admitted after number ``n + slack`` has a larger one, so at most
``slack`` requests admitted after it can go ahead of it in the engine's queue
(``test_fair_share``). The engine's own constraints still apply on top (a request whose
adapter cannot join the batch, ``max_loras``, waits for one that can).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class FairShare:
    def __init__(self, slack: int, half_life_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if slack < 0 or half_life_s <= 0:
            raise ValueError("slack must be >= 0 and half_life_s > 0")
        self.slack = slack
        self._rate = math.log(2) / half_life_s
        self._clock = clock
        self._usage: dict[str, tuple[float, float]] = {}  # tenant -> (usage per weight, at)
        self._total = 0.0  # sum of every tenant's usage, decayed alike (the decay is linear)
        self._total_at = clock()
        self._admitted = 0

    def _decayed(self, value: float, at: float, now: float) -> float:
        return value * math.exp(-self._rate * (now - at)) if now > at else value

    def charge(self, tenant: str, tokens: int, weight: float = 1.0) -> None:
        """``tokens`` the engine processed for ``tenant`` (prompt or completion)."""
        if tokens <= 0:
            return
        now = self._clock()
        value, at = self._usage.get(tenant, (0.0, now))
        cost = tokens / weight
        self._usage[tenant] = (self._decayed(value, at, now) + cost, now)
        self._total = self._decayed(self._total, self._total_at, now) + cost
        self._total_at = now

    def share(self, tenant: str) -> float:
        """``tenant``'s part of all tenants' recent usage per weight, 0 to 1."""
        now = self._clock()
        total = self._decayed(self._total, self._total_at, now)
        if total <= 0:
            return 0.0
        value, at = self._usage.get(tenant, (0.0, now))
        return min(1.0, self._decayed(value, at, now) / total)

    def priority(self, tenant: str) -> int:
        """The engine priority of ``tenant``'s next admitted request (lower runs first)."""
        self._admitted += 1
        return self._admitted + round(self.slack * self.share(tenant))

    def forget_idle(self, below: float = 1e-3) -> None:
        """Drop tenants whose usage decayed to nothing (bounded memory with many tenants)."""
        now = self._clock()
        for tenant, (value, at) in list(self._usage.items()):
            if self._decayed(value, at, now) < below:
                del self._usage[tenant]
