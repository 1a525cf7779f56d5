"""Scenarios and load loops of `lora-gateway loadtest`.

A scenario decides which adapter each request names and how caches are prepared:

    hot          every request names the first target (one adapter, always resident)
    uniform      uniform over all targets, nothing prepared (any OpenAI-compatible server)
    warm         uniform over all targets, after prefetching them into engine memory
    cold-disk    per target: evict it from engine memory (files stay on disk), then one
                 first request and ``cold_repeats`` repeats; sequential, needs the admin key
    cold-remote  the same, evicting from disk too, so the first request fetches from the store
    warm-swap    per target, cycling through more targets than the gateway's batch slots
                 (``max_loras``): all held in engine memory, so each visit's first request
                 swaps an adapter from engine memory into a slot; needs the admin key
    zipf         Zipf(s)-distributed over the targets in their given order (churn)
    tenants      uniform over targets of several tenants (a mix of keys)

Load loops: closed (``concurrency`` requests always in flight) or open (arrivals at a
fixed ``rate``, evenly spaced or Poisson), both bounded by ``duration`` and
``max_requests``. Cold scenarios always run one request at a time: a swap penalty is
measured in isolation.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from loadtest.client import RequestRecord, RequestShape, Target, send

Scenario = Literal["hot", "uniform", "warm", "warm-swap", "cold-disk", "cold-remote", "zipf",
                   "tenants"]
SCENARIOS: tuple[Scenario, ...] = ("hot", "uniform", "warm", "warm-swap", "cold-disk", "cold-remote",
                                   "zipf", "tenants")
# What each probe scenario evicts before a target's first request (None: nothing).
_PROBES: dict[str, str | None] = {"cold-disk": "engine", "cold-remote": "all", "warm-swap": None}
_MAX_IN_FLIGHT = 1024  # an open loop never holds more; arrivals beyond it are counted as dropped


class LoadTestError(Exception):
    """The run cannot start as configured (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class RunSpec:
    url: str
    targets: Sequence[Target]
    scenario: Scenario = "hot"
    mode: Literal["closed", "open"] = "closed"
    concurrency: int = 4
    rate: float = 2.0  # requests per second, open loop
    arrival: Literal["uniform", "poisson"] = "uniform"
    duration: float = 30.0
    max_requests: int = 200
    shape: RequestShape = field(default_factory=RequestShape)
    zipf_s: float = 1.1
    seed: int = 0
    admin_key: str | None = None
    cold_repeats: int = 1
    timeout: float = 300.0

    def check(self) -> None:
        problems = []
        if not self.targets:
            problems.append("no targets: give --api-key with --model, or --targets FILE")
        if self.scenario in _PROBES and not self.admin_key:
            problems.append(f"scenario {self.scenario} prepares the gateway's caches through its "
                            "admin API: give --admin-key (a plain vLLM server has no such tiers)")
        if self.scenario == "warm" and not self.admin_key:
            problems.append("scenario warm prefetches through the admin API: give --admin-key")
        if self.scenario == "tenants" and len({t.tenant for t in self.targets}) < 2:
            problems.append("scenario tenants needs targets of at least two tenants")
        if self.concurrency < 1 or self.rate <= 0 or self.duration <= 0 or self.max_requests < 1:
            problems.append("concurrency, rate, duration and max_requests must be positive")
        if self.cold_repeats < 1:
            problems.append("cold_repeats must be at least 1")
        if problems:
            raise LoadTestError("; ".join(problems))


@dataclass
class PhaseResult:
    name: str
    scenario: str
    distinct_adapters: int
    wall_seconds: float
    records: list[RequestRecord]
    dropped: int = 0


async def run_phase(spec: RunSpec, name: str | None = None) -> PhaseResult:
    """Prepare the caches the scenario needs, then run its load loop."""
    spec.check()
    limits = httpx.Limits(max_connections=_MAX_IN_FLIGHT, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=spec.timeout, limits=limits) as client:
        t0 = time.perf_counter()
        if spec.scenario in _PROBES:
            records = await _cold_probe(client, spec, t0)
            dropped = 0
        else:
            if spec.scenario == "warm":
                await admin_call(client, spec, "prefetch",
                                 {"adapters": [_ref(t) for t in spec.targets], "into": "engine"})
            pick = _picker(spec)
            t0 = time.perf_counter()
            if spec.mode == "closed":
                records, dropped = await _closed_loop(client, spec, pick, t0), 0
            else:
                records, dropped = await _open_loop(client, spec, pick, t0)
        wall = time.perf_counter() - t0
    distinct = len({r.target for r in records})
    return PhaseResult(name or spec.scenario, spec.scenario, distinct, wall, records, dropped)


def _ref(target: Target) -> str:
    return f"{target.tenant}/{target.model}"


async def admin_call(client: httpx.AsyncClient, spec: RunSpec, op: str,
                     body: dict[str, object] | None = None) -> dict[str, Any]:
    """POST /admin/v1/cache/{op} (GET the cache state without a body)."""
    url = f"{spec.url.rstrip('/')}/admin/v1/cache" + (f"/{op}" if body is not None else "")
    headers = {"Authorization": f"Bearer {spec.admin_key}"}
    resp = await (client.post(url, json=body, headers=headers) if body is not None
                  else client.get(url, headers=headers))
    if resp.status_code != 200:
        raise LoadTestError(f"admin {op} failed ({resp.status_code}): {resp.text[:300]}")
    doc: dict[str, Any] = resp.json()
    if doc.get("failed"):
        raise LoadTestError(f"admin {op} failed for {doc['failed']} adapter(s): {resp.text[:300]}")
    return doc


def _picker(spec: RunSpec) -> Callable[[], Target]:
    rng = random.Random(spec.seed)
    targets = list(spec.targets)
    if spec.scenario == "hot":
        return lambda: targets[0]
    if spec.scenario == "zipf":
        weights = [1.0 / (rank ** spec.zipf_s) for rank in range(1, len(targets) + 1)]
        return lambda: rng.choices(targets, weights)[0]
    return lambda: rng.choice(targets)


class _Bounds:
    def __init__(self, spec: RunSpec, t0: float) -> None:
        self.deadline = t0 + spec.duration
        self.left = spec.max_requests
        self.seen: set[str] = set()

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True

    def first(self, target: Target) -> bool:
        fresh = target.label not in self.seen
        self.seen.add(target.label)
        return fresh


async def _one(client: httpx.AsyncClient, spec: RunSpec, target: Target, t0: float,
               phase: str, first: bool) -> RequestRecord:
    record = RequestRecord(target.label, phase, time.perf_counter() - t0, first_on_adapter=first)
    return await send(client, spec.url, target, spec.shape, record)


async def _closed_loop(client: httpx.AsyncClient, spec: RunSpec, pick: Callable[[], Target],
                       t0: float) -> list[RequestRecord]:
    bounds = _Bounds(spec, t0)
    records: list[RequestRecord] = []

    async def worker() -> None:
        while bounds.take():
            target = pick()
            records.append(await _one(client, spec, target, t0, spec.scenario, bounds.first(target)))

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    return records


async def _open_loop(client: httpx.AsyncClient, spec: RunSpec, pick: Callable[[], Target],
                     t0: float) -> tuple[list[RequestRecord], int]:
    bounds = _Bounds(spec, t0)
    rng = random.Random(spec.seed + 1)
    tasks: set[asyncio.Task[RequestRecord]] = set()
    records: list[RequestRecord] = []
    dropped = 0
    next_at = t0
    while bounds.take():
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        gap = rng.expovariate(spec.rate) if spec.arrival == "poisson" else 1.0 / spec.rate
        next_at += gap
        if len(tasks) >= _MAX_IN_FLIGHT:
            dropped += 1
            continue
        target = pick()
        task = asyncio.create_task(_one(client, spec, target, t0, spec.scenario, bounds.first(target)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda t: records.append(t.result()))
    if tasks:
        await asyncio.gather(*tasks)
    return records, dropped


async def _cold_probe(client: httpx.AsyncClient, spec: RunSpec, t0: float) -> list[RequestRecord]:
    """Per target: put it in the scenario's tier, then one first request and its repeats."""
    bounds = _Bounds(spec, t0)
    records: list[RequestRecord] = []
    where = _PROBES[spec.scenario]
    refs = [_ref(t) for t in spec.targets]
    if where == "engine":  # make sure each is on local disk before it is evicted from memory
        await admin_call(client, spec, "prefetch", {"adapters": refs, "into": "disk"})
    if where is None:
        slots = (await admin_call(client, spec, "state"))["slot"]["capacity"]
        if len(set(refs)) <= slots:
            raise LoadTestError(f"scenario warm-swap needs more distinct targets than the gateway's "
                                f"{slots} batch slots (max_loras), got {len(set(refs))}")
        await admin_call(client, spec, "prefetch", {"adapters": refs, "into": "engine"})
    i = 0
    while True:
        target = spec.targets[i % len(spec.targets)]
        i += 1
        if where is not None:
            await admin_call(client, spec, "evict", {"adapter": _ref(target), "from": where})
        for n in range(1 + spec.cold_repeats):
            if not bounds.take():
                return records
            records.append(await _one(client, spec, target, t0, spec.scenario, first=n == 0))
