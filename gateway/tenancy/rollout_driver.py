"""Every replica offers to decide rollouts; the registry's lease lets one at a time.

Each ``every_s`` seconds the replica asks the registry to judge every running rollout
(``adapters_registry.rollouts``); only the holder of the decision lease does, and the
others' calls return at once. What changed is logged and counted in
``lgw_rollout_decisions_total``, and the alias changes reach every replica as any alias
move does (the change channel, else the resolve TTL). Every replica, lease or not, shows
each active rollout's step in ``lgw_rollout_candidate_percent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from adapters_registry import Rollout
from gateway.observability.logs import Throttled
from gateway.observability.metrics import GatewayMetrics

logger = logging.getLogger(__name__)


class Decider(Protocol):
    def decide(self, holder: str, *, lease_s: float = 30.0) -> list[Rollout]: ...

    def active(self) -> list[Rollout]: ...


class RolloutDriver:
    def __init__(self, rollouts: Decider, holder: str, metrics: GatewayMetrics,
                 every_s: float) -> None:
        self._rollouts = rollouts
        self._holder = holder
        self._metrics = metrics
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None
        self._failures = Throttled(logger)
        self._shown: set[tuple[str, ...]] = set()  # the step gauge's label sets now

    def start(self) -> None:
        if self._every_s > 0:
            self._task = asyncio.create_task(self._run(), name="rollout decisions")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def once(self) -> list[Rollout]:
        # The lease outlives a few missed rounds, so a slow database does not hand it around.
        changed = await asyncio.to_thread(self._rollouts.decide, self._holder,
                                          lease_s=max(30.0, 6 * self._every_s))
        for r in changed:
            self._metrics.rollout_decisions.labels(r.tenant, r.adapter, r.alias, r.state).inc()
            logger.info("rollout of %s/%s:%s v%d: %s at %d%% (%s)", r.tenant, r.adapter, r.alias,
                        r.candidate, r.state, r.percent, r.reason)
        self._show(await asyncio.to_thread(self._rollouts.active))
        return changed

    def _show(self, active: list[Rollout]) -> None:
        """lgw_rollout_candidate_percent for every active rollout; finished ones removed."""
        gauge = self._metrics.rollout_percent
        now: set[tuple[str, ...]] = set()
        for r in active:
            labels: tuple[str, ...] = (r.tenant, r.adapter, r.alias, f"v{r.candidate}", r.state)
            gauge.labels(*labels).set(r.percent)
            now.add(labels)
        for labels in self._shown - now:
            gauge.remove(*labels)
        self._shown = now

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self.once()
            except Exception as exc:  # the registry away: try again next round
                self._failures.log(logging.WARNING, "rollouts", "rollout decisions failed: %s", exc)
