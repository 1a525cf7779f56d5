"""Traffic for benchmarks.replicas: a closed-loop driver, its figures, and the calibration.

The calibration measures what the fleet simulator (benchmarks.fleet_model) needs and the
rounds must not give (reproducing them is its test): what each tier costs. Four phases go
through the round-robin router in a closed loop, the same shape as the rounds: ``hot``
(one adapter per replica: slot hits), ``engine`` (more adapters per replica than its batch
slots: engine hits), ``cold`` (more than its engine holds: disk loads) and ``remote``
(every adapter, with every disk emptied first: remote fetches, then disk loads),
alternating. Each phase's wall time, each tier's TTFT and every single request are kept;
benchmarks.fleet_sim fits the model's costs to them.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx

from benchmarks.fleet_model import COLD, TIERS
from loadtest.client import RequestRecord, RequestShape, Target, send

SESSION_HEADER = "X-Session-ID"
CALIBRATION_PHASES = ("hot", "engine", "cold", "remote")
T = TypeVar("T")


class Killable(Protocol):
    name: str

    def kill(self) -> None: ...


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values`` (nearest rank), NaN when there are none."""
    return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else float("nan")


@dataclass
class Sent:
    record: RequestRecord
    ended: float  # seconds since the phase's start


async def drive(url: str, trace: Sequence[Target], concurrency: int, max_tokens: int,
                kill: tuple[int, Killable] | None = None) -> tuple[list[Sent], float]:
    """Send ``trace`` in order, ``concurrency`` at a time, with the affinity header.

    ``kill``: (n, replica) kills ``replica`` once ``n`` requests have started and one of
    them is streaming from it (so a request is in flight on it). Returns the sent requests
    and the kill's time (seconds since the start; NaN without one).
    """
    shape = RequestShape(max_tokens=max_tokens)
    queue = list(enumerate(trace))[::-1]
    sent: list[Sent] = []
    streaming: dict[int, RequestRecord] = {}
    killed = float("nan")
    t0 = time.perf_counter()

    async def killer(victim: Killable) -> None:
        nonlocal killed
        deadline = time.perf_counter() + 60
        while not any(r.replica == victim.name and r.status == 200 for r in streaming.values()):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no request was ever in flight on {victim.name}")
            await asyncio.sleep(0.002)
        # The moment of the signal: a request that starts while the kill is under way was
        # sent to a dying replica (after the kill), not in flight on it.
        killed = time.perf_counter() - t0
        await asyncio.to_thread(victim.kill)

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []

        async def worker() -> None:
            while queue:
                i, t = queue.pop()
                if kill is not None and i == kill[0]:
                    tasks.append(asyncio.create_task(killer(kill[1])))
                record = RequestRecord(t.label, "trace", time.perf_counter() - t0)
                streaming[i] = record
                await send(client, url, t, shape, record, {SESSION_HEADER: t.label})
                del streaming[i]
                sent.append(Sent(record, time.perf_counter() - t0))

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        await asyncio.gather(*tasks)
    return sent, killed


def figures(sent: Sequence[Sent]) -> dict[str, Any]:
    ok = [s.record for s in sent if s.record.ok]
    replicas = sorted({r.replica or "?" for r in ok})
    ttfts = sorted(r.ttft * 1000 for r in ok if r.ttft is not None)
    e2es = sorted(r.e2e * 1000 for r in ok if r.e2e is not None)
    tiers = {t: sum(r.tier == t for r in ok) for t in TIERS}

    return {"requests": len(sent), "ok": len(ok), "tiers": tiers,
            "cold_per_request": round(sum(tiers[t] for t in COLD) / max(1, len(ok)), 4),
            "ttft_ms": {"p50": pct(ttfts, 0.5), "p99": pct(ttfts, 0.99)},
            "e2e_ms": {"p50": pct(e2es, 0.5), "p99": pct(e2es, 0.99)},
            "wall_s": round(max((s.ended for s in sent), default=0.0), 3),
            "ttft_by_tier_ms": {t: pct(sorted(r.ttft * 1000 for r in ok if r.tier == t
                                              and r.ttft is not None), 0.5)
                                for t in TIERS if tiers[t]},
            "by_replica": {k: sum(r.replica == k for r in ok) for k in replicas},
            # every answered request in the order sent: [tier, replica, start s, TTFT ms, e2e ms]
            "requests_seen": [[r.tier, r.replica, round(r.started, 4), round(r.ttft * 1000, 2),
                               round((r.e2e or 0.0) * 1000, 2)]
                              for r in sorted(ok, key=lambda r: r.started) if r.ttft is not None],
            "errors": sorted({f"{s.record.status} {s.record.error}" for s in sent if not s.record.ok})}


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def calibration_trace(phase: str, targets: Sequence[T], replicas: int, slots: int,
                      engine: int, requests: int) -> list[T]:
    """The phase's requests. Round robin sends request ``i`` to replica ``i mod replicas``
    (plus the router's running count), so adapter ``i mod k`` always meets the same replica:
    ``k = replicas`` gives each one adapter (slot hits), ``replicas x (slots + 1)`` cycles
    more adapters than its slots through each (engine hits), ``replicas x (engine + 1)``
    more than its engine holds (disk loads), and ``remote`` cycles them all. The tiers
    actually served are measured, not assumed."""
    per_replica = {"hot": 1, "engine": slots + 1, "cold": engine + 1,
                   "remote": len(targets) // replicas}[phase]
    k = replicas * per_replica
    if k > len(targets):
        raise ValueError(f"the {phase} phase needs {k} adapters; the trace has {len(targets)}")
    return [targets[i % k] for i in range(requests)]


async def calibrate(url: str, targets: Sequence[Target], *, replicas: int, slots: int, engine: int,
                    requests: int, concurrency: int, max_tokens: int, rounds: int,
                    reset: Any) -> dict[str, Any]:
    """The phases, ``rounds`` times each in alternating order.

    ``reset(remote)``: an async callable run before each phase; it empties every replica's
    engine, and then either puts every adapter on every disk or (``remote``) empties the
    disks."""
    measured: dict[str, list[dict[str, Any]]] = {p: [] for p in CALIBRATION_PHASES}
    for r in range(rounds):
        for phase in CALIBRATION_PHASES if r % 2 == 0 else CALIBRATION_PHASES[::-1]:
            await reset(phase == "remote")
            trace = calibration_trace(phase, targets, replicas, slots, engine, requests)
            sent, _ = await drive(url, trace, concurrency, max_tokens)
            f = figures(sent)
            if f["errors"]:
                raise RuntimeError(f"calibration {phase}: {f['errors'][:3]}")
            measured[phase].append(f)
            print(f"  calibration {phase:6s} {f['tiers']} wall {f['wall_s']} s "
                  f"ttft p50 {f['ttft_ms']['p50']} ms", flush=True)
    return {"requests": requests, "rounds": rounds, "phases": measured}
