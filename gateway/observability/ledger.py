"""This process's side of the usage ledger (adapters_registry.usage): every answer counted
in memory on the request path (a dict update), written to the registry database in one
transaction every ``flush_s`` seconds, off the request path.

Beside each row's counts, its answers' figures (``adapters_registry.answer_stats``: times
to first token, latencies, refusals, shadow comparisons) are kept and written the same
way: what rollouts compare versions on.

This process is one writer (its replica name and an id of its own): it writes absolute
totals for its rows, so a flush that fails is simply written again, whole, by the next
one (nothing counted twice, nothing lost while the process lives), and the final flush
at shutdown leaves nothing behind. A process killed without one loses at most its last
``flush_s`` seconds of counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from adapters_registry import AnswerStats, RegistryError, UsageCounts, UsageRecord
from gateway.observability.logs import Throttled

logger = logging.getLogger(__name__)
_failures = Throttled(logger)
Key = tuple[str, str, datetime]  # tenant, model, minute
# Rows kept while the database refuses them: days of minutes for hundreds of tenants' models.
MAX_PENDING_ROWS = 200_000


class UsageSink(Protocol):
    def record_usage(self, writer: str, records: list[UsageRecord]) -> None: ...


class UsageLedger:
    """Counts answers per tenant, model and minute; ``start`` writes them out periodically."""

    def __init__(self, replica: str, flush_s: float = 10.0) -> None:
        self.writer = f"{replica}:{uuid.uuid4().hex[:12]}"
        self.flush_s = flush_s
        self._totals: dict[Key, UsageCounts] = {}
        self._stats: dict[Key, AnswerStats] = {}  # rows with figures (not every row has)
        # What the database holds of ours: each row's counts and its figures' change count.
        self._written: dict[Key, tuple[UsageCounts, int]] = {}
        self._sink: UsageSink | None = None
        self._task: asyncio.Task[None] | None = None

    def record(self, tenant: str, model: str, status: str, *, prompt_tokens: int,
               completion_tokens: int, ttft_s: float | None = None,
               latency_s: float | None = None, refused: bool = False) -> None:
        """One answer: ``status`` is its HTTP status, or "aborted" (the client left);
        ``ttft_s``/``latency_s``: its time to first token and (a whole answer's) latency."""
        key = self._key(tenant, model)
        counts = self._totals.get(key, UsageCounts())
        kind = {"2": "requests_2xx", "4": "requests_4xx", "5": "requests_5xx"}.get(status[:1], "aborted")
        self._totals[key] = replace(counts, **{kind: getattr(counts, kind) + 1},
                                    prompt_tokens=counts.prompt_tokens + prompt_tokens,
                                    completion_tokens=counts.completion_tokens + completion_tokens)
        if ttft_s is not None or latency_s is not None or refused:
            self._figures(key).answer(ttft_s, latency_s, refused)

    def record_shadow(self, tenant: str, model: str, *, agreed: bool, prefix: float,
                      kl: float) -> None:
        """One shadow comparison of ``model`` (the candidate) with the stable version."""
        self._figures(self._key(tenant, model)).shadow(agreed, prefix, kl)

    def _key(self, tenant: str, model: str) -> Key:
        key = (tenant, model, datetime.now(UTC).replace(second=0, microsecond=0))
        self._totals.setdefault(key, UsageCounts())
        return key

    def _figures(self, key: Key) -> AnswerStats:
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = AnswerStats()
        return stats

    def _state(self, key: Key) -> tuple[UsageCounts, int]:
        stats = self._stats.get(key)
        return self._totals[key], stats.changes if stats is not None else 0

    def start(self, sink: UsageSink) -> None:
        self._sink = sink
        self._task = asyncio.create_task(self._run(), name="usage ledger")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the periodic writes, then write what is left (once, within ``timeout_s``)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sink is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), timeout_s)
            if self.pending():
                logger.error("usage ledger: %d row(s) of usage could not be written at shutdown",
                             self.pending())

    def pending(self) -> int:
        return sum(1 for key in self._totals if self._written.get(key) != self._state(key))

    async def flush(self) -> bool:
        """Write every row that changed since its last write; False if the database refused."""
        changed = {k: self._state(k) for k in self._totals if self._written.get(k) != self._state(k)}
        if changed and self._sink is not None:
            records = [UsageRecord(t, m, minute, c, self._stats[(t, m, minute)].as_json()
                                   if (t, m, minute) in self._stats else None)
                       for (t, m, minute), (c, _) in changed.items()]
            try:
                await asyncio.to_thread(self._sink.record_usage, self.writer, records)
            except RegistryError as exc:  # the database is away: the next flush writes them
                _failures.log(logging.WARNING, "flush", "usage ledger: %d row(s) not written yet, "
                              "kept for the next flush: %s", len(records), exc)
                self._bound()
                return False
            self._written.update(changed)
        self._forget_old()
        return True

    def _bound(self) -> None:
        """Past ``MAX_PENDING_ROWS`` unwritten rows (a database that refuses for days), drop
        the oldest minutes, saying how much usage is lost: memory must not grow forever."""
        excess = len(self._totals) - MAX_PENDING_ROWS
        if excess <= 0:
            return
        oldest = sorted(self._totals, key=lambda k: k[2])[:excess]
        lost = UsageCounts()
        for key in oldest:
            lost = lost + self._totals.pop(key)
            self._stats.pop(key, None)
            self._written.pop(key, None)
        logger.error("usage ledger: the database refused its rows for too long; dropped the %d "
                     "oldest (%d requests, %d prompt and %d completion tokens) to bound memory",
                     excess, lost.requests_2xx + lost.requests_4xx + lost.requests_5xx + lost.aborted,
                     lost.prompt_tokens, lost.completion_tokens)

    def _forget_old(self) -> None:
        """Rows of past minutes that are written never change again: drop them."""
        current = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
        for key in [k for k in self._totals if k[2] < current and self._written.get(k) == self._state(k)]:
            del self._totals[key]
            self._stats.pop(key, None)
            del self._written[key]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()


__all__ = ["UsageLedger"]
