"""The fleet model: N replicas x M adapters under Zipf tenant/adapter traffic, by routing policy.

Each replica has the gateway's three adapter tiers (gateway/adapters.py), each an LRU:
batch slots (``max_loras``), engine memory (``max_cpu_loras``) and the local disk; a
request's tier is the highest one holding its adapter (``slot_hit``, ``engine_hit``,
``disk_hit``, else ``remote_fetch``), and the adapter then enters every tier. A replica
is one FCFS server: a request occupies it for the hot TTFT plus its tier's swap penalty,
so TTFT = wait + hot TTFT + penalty and cold loads cost capacity as well as latency. The
hot TTFT and the penalties are measured: the reproduction uses the replica run's own
per-tier TTFT medians (same load, scaled to service times); the fleet table uses benchmarks.serving's swap
penalties, measured one request at a time (benchmarks/results/bench.json).

Policies: ``round_robin``; ``consistent_hash`` (a ring of 160 virtual nodes per replica,
keyed on tenant/adapter, as vllm-router's); ``bounded_load`` (the same ring, walking on
past replicas whose in-flight count exceeds ceil((1 + eps) * average): Mirrokni, Thorup and
Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018); ``gie`` (the endpoint
picker's LoRA affinity: among replicas whose queue is below a threshold, prefer one holding
the adapter in engine memory, least loaded first; else the least loaded replica).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TIERS = ("slot_hit", "engine_hit", "disk_hit", "remote_fetch")
COLD = ("disk_hit", "remote_fetch")  # the adapter was not in engine memory: a load
POLICIES = ("round_robin", "consistent_hash", "bounded_load", "gie")
VNODES = 160  # vllm-router's virtual nodes per worker


def zipf_trace(tenants: int, per_tenant: int, requests: int, s: float, seed: int) -> np.ndarray:
    """Adapter indices (``tenant * per_tenant + adapter``): tenants Zipf(s), adapters within a
    tenant Zipf(s), each ranking a seeded shuffle (popularity is not the index order)."""
    rng = np.random.default_rng(seed)

    def weights(n: int) -> np.ndarray:
        w = 1.0 / np.arange(1, n + 1) ** s
        return np.asarray(rng.permutation(w / w.sum()))

    tenant = rng.choice(tenants, size=requests, p=weights(tenants))
    adapter = rng.choice(per_tenant, size=requests, p=weights(per_tenant))
    return np.asarray(tenant * per_tenant + adapter)


@dataclass(frozen=True)
class Costs:
    """Seconds: a hot request's TTFT, and what each tier adds to it."""

    hot_s: float
    penalty_s: dict[str, float]


@dataclass(frozen=True)
class Capacity:
    slots: int  # max_loras
    engine: int  # max_cpu_loras
    disk: int  # adapters the local disk cache holds


@dataclass
class Replica:
    cap: Capacity
    tiers: list[OrderedDict[int, None]] = field(default_factory=lambda: [OrderedDict() for _ in range(3)])

    def serve(self, adapter: int) -> tuple[str, int | None]:
        """The tier that serves ``adapter``; it enters every tier. Returns (tier, engine victim)."""
        tier = next((TIERS[i] for i, t in enumerate(self.tiers) if adapter in t), "remote_fetch")
        victim = None
        for i, size in enumerate((self.cap.slots, self.cap.engine, self.cap.disk)):
            t = self.tiers[i]
            t[adapter] = None
            t.move_to_end(adapter)
            if len(t) > size:
                gone, _ = t.popitem(last=False)
                if i == 1:
                    victim = gone
        return tier, victim


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class Ring:
    """A consistent-hash ring of ``VNODES`` points per replica."""

    def __init__(self, replicas: int) -> None:
        points = sorted((_hash(f"replica-{r}#{v}"), r) for r in range(replicas) for v in range(VNODES))
        self.keys = [p for p, _ in points]
        self.owner = [r for _, r in points]

    def walk(self, key: str) -> Any:
        """Replicas in ring order from ``key``'s point (each replica may repeat)."""
        i = bisect.bisect(self.keys, _hash(key))
        n = len(self.keys)
        for j in range(n):
            yield self.owner[(i + j) % n]


@dataclass(frozen=True)
class Config:
    replicas: int
    tenants: int
    per_tenant: int
    cap: Capacity
    requests: int
    zipf_s: float = 1.1
    seed: int = 0
    concurrency: int | None = None  # closed loop with this many clients; None: open loop
    utilization: float = 0.7  # open loop: offered load / fleet capacity at hot TTFT
    warmup: float = 0.0  # fraction of requests not measured (caches filling)
    start_on_disk: bool = False  # every adapter on every replica's disk at the start
    eps: float = 0.25  # bounded_load's slack
    gie_queue_threshold: int = 8  # gie: replicas with more in flight are not preferred
    # None: each replica is its own server (a fleet). k: all replicas share k servers, as
    # the replica run's engines share this machine's CPU cores (caches stay per replica).
    shared_servers: int | None = None

    @property
    def adapters(self) -> int:
        return self.tenants * self.per_tenant


def simulate(cfg: Config, policy: str, costs: Costs, trace: np.ndarray | None = None,
             rr_offset: int = 0, placement: dict[int, int] | None = None) -> dict[str, Any]:
    """Replay ``trace`` (or a fresh Zipf one) under ``policy``: tier rates, TTFT, imbalance.

    ``placement`` (adapter -> replica) replaces the ring of ``consistent_hash`` for the
    adapters it names (to replay a real router's choices)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if trace is None:
        trace = zipf_trace(cfg.tenants, cfg.per_tenant, cfg.requests, cfg.zipf_s, cfg.seed)
    n = cfg.replicas
    reps = [Replica(cfg.cap) for _ in range(n)]
    if cfg.start_on_disk:
        for r in reps:
            r.tiers[2].update((a, None) for a in range(cfg.adapters))
    ring = Ring(n) if policy in ("consistent_hash", "bounded_load") else None
    holders: dict[int, set[int]] = {}  # gie: adapter -> replicas holding it in engine memory
    in_flight = np.zeros(n, dtype=np.int64)
    finishing: list[tuple[float, int]] = []  # (finish time, replica), all requests in flight
    free_at = np.zeros(cfg.shared_servers or n)
    rng = np.random.default_rng(cfg.seed + 1)
    mean_service = costs.hot_s
    if cfg.concurrency:
        clients = [(0.0, c) for c in range(cfg.concurrency)]
        heapq.heapify(clients)
    else:
        gaps = rng.exponential(mean_service / (cfg.utilization * n), size=len(trace))
        arrivals = np.cumsum(gaps)
    skip = int(len(trace) * cfg.warmup)
    tiers_seen: dict[str, int] = dict.fromkeys(TIERS, 0)
    ttfts = np.empty(len(trace) - skip)
    served = np.zeros(n, dtype=np.int64)
    busy = 0.0  # service seconds of the measured requests
    first = last = 0.0
    for k, adapter in enumerate(trace.tolist()):
        now = heapq.heappop(clients)[0] if cfg.concurrency else float(arrivals[k])
        while finishing and finishing[0][0] <= now:
            in_flight[heapq.heappop(finishing)[1]] -= 1
        key = f"{adapter // cfg.per_tenant}/{adapter % cfg.per_tenant}"
        if policy == "round_robin":
            rep = (k + rr_offset) % n
        elif policy == "consistent_hash":
            assert ring is not None
            rep = placement[adapter] if placement and adapter in placement else next(ring.walk(key))
        elif policy == "bounded_load":
            assert ring is not None
            bound = math.ceil((1 + cfg.eps) * (in_flight.sum() + 1) / n)
            rep = next(r for r in ring.walk(key) if in_flight[r] < bound)
        else:
            ok = [r for r in holders.get(adapter, ()) if in_flight[r] < cfg.gie_queue_threshold]
            if ok:
                rep = min(ok, key=lambda r: in_flight[r])
            else:
                rep = int(np.argmin(in_flight + rng.random(n) * 0.5))
        tier, victim = reps[rep].serve(adapter)
        if policy == "gie":
            holders.setdefault(adapter, set()).add(rep)
            if victim is not None:
                holders[victim].discard(rep)
        server = int(np.argmin(free_at)) if cfg.shared_servers else rep
        start = max(now, float(free_at[server]))
        service = costs.hot_s + costs.penalty_s.get(tier, 0.0)
        finish = start + service
        free_at[server] = finish
        in_flight[rep] += 1
        heapq.heappush(finishing, (finish, rep))
        if cfg.concurrency:
            heapq.heappush(clients, (finish, 0))
        if k >= skip:
            if k == skip:
                first = now
            last = now
            busy += service
            tiers_seen[tier] += 1
            ttfts[k - skip] = finish - now
            served[rep] += 1
    measured = len(trace) - skip
    return {
        "policy": policy, "requests": measured,
        "tier_rates": {t: round(c / measured, 4) for t, c in tiers_seen.items()},
        "cold_per_request": round(sum(tiers_seen[t] for t in COLD) / measured, 4),
        "ttft_ms": {"p50": round(float(np.percentile(ttfts, 50)) * 1000, 2),
                    "p99": round(float(np.percentile(ttfts, 99)) * 1000, 2)},
        "imbalance_max_over_mean": round(float(served.max() / served.mean()), 3),
        # work offered per replica-second: above 1 the queues grow for as long as the trace runs
        "offered_utilization": round(busy / (n * max(last - first, 1e-9)), 3),
    }
