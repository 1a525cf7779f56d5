"""The fleet model: N replicas x M adapters under Zipf tenant/adapter traffic, by routing policy.

Each replica has the gateway's three adapter tiers (gateway/residency/manager.py), each an LRU:
batch slots (``max_loras``), engine memory (``max_cpu_loras``) and the local disk; a
request's tier is the highest one holding its adapter (``slot_hit``, ``engine_hit``,
``disk_hit``, else ``remote_fetch``), and the adapter then enters every tier. A replica
batches continuously, as vLLM does:

- an engine step serves its whole batch, whose requests use at most ``max_loras`` adapters
  (vLLM's scheduler skips a waiting request that would add one more);
- a request joins at the next step once its overhead and its tier's delay (fetching,
  verifying, loading its adapter) are over, each drawn with the spread measured for its
  tier; it gets its first token at the end of that step and leaves after ``tokens`` steps;
- a request whose adapter is still loading for an earlier one waits for that load and
  reports its tier (the gateway loads an adapter once);
- a load lengthens its replica's next step (``block_s``: add_lora runs between steps);
- replicas that share cores (the replica run: every engine on this machine's unreserved
  core) share them by processor sharing, so a step lasts longer while other steps run.

The costs are fitted to the replica run's calibration (benchmarks.fleet_sim.costs_from_run).

Policies: ``round_robin``; ``consistent_hash`` (a ring of 160 virtual nodes per replica,
keyed on tenant/adapter, as vllm-router's); ``bounded_load`` (the same ring, walking on
past replicas whose in-flight count exceeds ceil((1 + eps) * average): Mirrokni, Thorup and
Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018); ``gie`` (the endpoint
picker's LoRA affinity: among replicas whose waiting queue is below a threshold, prefer one
holding the adapter in engine memory, least loaded first; else the least loaded replica).
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

from benchmarks.processor_sharing import SharedCores

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
    """A replica's engine steps and what each tier makes a request wait before its first."""

    step_s: float  # one engine step (prefill or one decode token) for the whole batch
    tokens: int  # steps per request (its max_tokens)
    delay_s: dict[str, float]  # tier -> seconds before the request can join a batch
    overhead_s: float = 0.0  # every request's time before its engine sees it (HTTP, gateway)
    # tier -> engine time its load takes from every request on the replica (add_lora runs
    # between the engine's steps): the next step is this much longer
    block_s: dict[str, float] = field(default_factory=dict)
    # tier -> measured deviations of single requests from their tier's median TTFT (seconds):
    # each request draws one and waits that much longer (or shorter) before its engine
    # sees it. Without them every request of a tier is alike, and a percentile that falls
    # between two tiers' requests jumps from one tier's latency to the other's.
    jitter_s: dict[str, tuple[float, ...]] = field(default_factory=dict)


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
    utilization: float = 0.7  # open loop: offered load / fleet capacity (full hot batches)
    max_batch: int = 8  # requests one engine step serves; more wait on the replica
    warmup: float = 0.0  # fraction of requests not measured (caches filling)
    start_on_disk: bool = False  # every adapter on every replica's disk at the start
    eps: float = 0.25  # bounded_load's slack
    # gie: replicas with this many requests waiting (not in a batch) are not preferred
    # (GIE's low-queue filter, DefaultQueueingThresholdLoRA = 128)
    gie_queue_threshold: int = 128
    # None: each replica has its own accelerator (a fleet). k: the replicas share k cores,
    # as the replica run's engines share this machine's (processor sharing: a step takes
    # longer while more than k replicas are stepping).
    shared_servers: int | None = None

    @property
    def adapters(self) -> int:
        return self.tenants * self.per_tenant


@dataclass
class _Request:
    k: int  # index in the trace
    rep: int
    adapter: int
    arrived: float
    tier: str
    loads: bool  # it loads its adapter (others may wait for that load)
    done: int = 0  # steps served
    first: float | None = None


@dataclass
class _Engine:
    waiting: list[_Request] = field(default_factory=list)  # ready, no room in the batch yet
    batch: list[_Request] = field(default_factory=list)
    stepping: bool = False
    blocked_s: float = 0.0  # loads the next step waits for
    loading: dict[int, tuple[float, str]] = field(default_factory=dict)  # adapter -> (done, tier)


def simulate(cfg: Config, policy: str, costs: Costs, trace: np.ndarray | None = None,
             placement: dict[int, int] | None = None, jitter_seed: int = 0) -> dict[str, Any]:
    """Replay ``trace`` (or a fresh Zipf one) under ``policy``: tier rates, TTFT, imbalance.

    Each replica batches continuously, as vLLM does: a step serves every request in its
    batch (up to ``max_batch``), a request joins at the next step once its tier's delay is
    over, its first token comes at the end of its first step and it leaves after
    ``costs.tokens`` steps; a request's wait before it joins varies by a draw from its
    tier's ``costs.jitter_s`` (seeded by ``jitter_seed``). ``placement`` (adapter ->
    replica) replaces the ring of ``consistent_hash`` for the adapters it names (to replay a
    real router's choices)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if trace is None:
        trace = zipf_trace(cfg.tenants, cfg.per_tenant, cfg.requests, cfg.zipf_s, cfg.seed)
    n = cfg.replicas
    reps = [Replica(cfg.cap) for _ in range(n)]
    if cfg.start_on_disk:
        for r in reps:
            r.tiers[2].update((a, None) for a in range(cfg.adapters))
    engines = [_Engine() for _ in range(n)]
    ring = Ring(n) if policy in ("consistent_hash", "bounded_load") else None
    holders: dict[int, set[int]] = {}  # gie: adapter -> replicas holding it in engine memory
    in_flight = np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(cfg.seed + 1)
    jitter_rng = np.random.default_rng(cfg.seed + 2 + jitter_seed)
    adapters = trace.tolist()
    events: list[tuple[float, int, str, Any]] = []  # (time, sequence, kind, payload)
    seq = 0

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    if cfg.concurrency:
        for k in range(min(cfg.concurrency, len(adapters))):
            push(0.0, "arrive", k)
        next_k = min(cfg.concurrency, len(adapters))
    else:
        capacity = n * cfg.max_batch / (costs.tokens * costs.step_s)
        arrivals = np.cumsum(rng.exponential(1 / (cfg.utilization * capacity), size=len(adapters)))
        for k, t in enumerate(arrivals.tolist()):
            push(t, "arrive", k)
    skip = int(len(adapters) * cfg.warmup)
    tiers_seen: dict[str, int] = dict.fromkeys(TIERS, 0)
    ttfts: list[float] = []
    decodes: list[float] = []  # seconds per token after the first
    # open loop: each replica's requests in flight when the first measured request arrived
    # and when the last did, and the measured requests it received
    in_flight_at_start = in_flight_at_end = np.zeros(n, dtype=np.int64)
    arrived_measured = np.zeros(n, dtype=np.int64)
    by_tier: dict[str, list[float]] = {}
    served = np.zeros(n, dtype=np.int64)
    cores = SharedCores(cfg.shared_servers) if cfg.shared_servers else None
    first_arrival = last_done = 0.0

    def route(k: int, adapter: int) -> int:
        key = f"{adapter // cfg.per_tenant}/{adapter % cfg.per_tenant}"
        if policy == "round_robin":
            return k % n
        if policy == "consistent_hash":
            assert ring is not None
            return placement[adapter] if placement and adapter in placement else next(ring.walk(key))
        if policy == "bounded_load":
            assert ring is not None
            bound = math.ceil((1 + cfg.eps) * (in_flight.sum() + 1) / n)
            return int(next(r for r in ring.walk(key) if in_flight[r] < bound))
        ok = [r for r in holders.get(adapter, ()) if len(engines[r].waiting) < cfg.gie_queue_threshold]
        if ok:
            return min(ok, key=lambda r: in_flight[r])
        return int(np.argmin(in_flight + rng.random(n) * 0.5))

    def next_step_end() -> None:
        assert cores is not None
        if (end := cores.next_end()) is not None:
            push(end[0], "step", (end[1], cores.version))

    def start_step(rep: int, now: float) -> None:
        e = engines[rep]
        # vLLM's scheduler: a waiting request whose adapter would be one more than max_loras
        # in the batch is skipped for this step, and the next one considered
        loras = {r.adapter for r in e.batch}
        skipped = []
        while e.waiting and len(e.batch) < cfg.max_batch:
            req = e.waiting.pop(0)
            if req.adapter not in loras and len(loras) >= cfg.cap.slots:
                skipped.append(req)
                continue
            loras.add(req.adapter)
            e.batch.append(req)
        e.waiting[:0] = skipped
        if not e.batch:
            return
        e.stepping = True
        work, e.blocked_s = costs.step_s + e.blocked_s, 0.0
        if cores is None:
            push(now + work, "step", (rep, None))
        else:
            cores.start(now, rep, work)
            next_step_end()

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            k = payload
            adapter = adapters[k]
            rep = route(k, adapter)
            tier, victim = reps[rep].serve(adapter)
            if policy == "gie":
                holders.setdefault(adapter, set()).add(rep)
                if victim is not None:
                    holders[victim].discard(rep)
            in_flight[rep] += 1
            if k == skip:
                in_flight_at_start = in_flight.copy()
            if k >= skip:
                arrived_measured[rep] += 1
            if k == len(adapters) - 1:
                in_flight_at_end = in_flight.copy()
            if k == skip:
                first_arrival = now
            wait = costs.overhead_s + costs.delay_s.get(tier, 0.0)
            if costs.jitter_s.get(tier):
                wait = max(0.0, wait + float(jitter_rng.choice(costs.jitter_s[tier])))
            ready, loads = now + wait, tier in COLD
            pending = engines[rep].loading.get(adapter)
            if loads:
                engines[rep].loading[adapter] = (ready, tier)
            elif pending and pending[0] > now:
                # its adapter is still loading for an earlier request: it waits for that load
                # (the gateway loads an adapter once) and reports that load's tier
                ready, tier = max(ready, pending[0]), pending[1]
            push(ready, "ready", _Request(k, rep, adapter, now, tier, loads))
        elif kind == "ready":
            req = payload
            if req.loads:
                engines[req.rep].blocked_s += costs.block_s.get(req.tier, 0.0)
            engines[req.rep].waiting.append(req)
            if not engines[req.rep].stepping:
                start_step(req.rep, now)
        else:  # a step ended
            rep, version = payload
            if cores is not None:
                if version != cores.version:
                    continue  # the running set changed since: a later event has its end
                cores.end(now, rep)
            e = engines[rep]
            e.stepping = False
            still = []
            for req in e.batch:
                req.done += 1
                if req.first is None:
                    req.first = now
                if req.done < costs.tokens:
                    still.append(req)
                    continue
                in_flight[rep] -= 1
                if req.k >= skip:
                    tiers_seen[req.tier] += 1
                    ttfts.append(req.first - req.arrived)
                    if costs.tokens > 1:
                        decodes.append((now - req.first) / (costs.tokens - 1))
                    by_tier.setdefault(req.tier, []).append(req.first - req.arrived)
                    served[rep] += 1
                    last_done = now
                if cfg.concurrency and next_k < len(adapters):
                    push(now, "arrive", next_k)
                    next_k += 1
            e.batch = still
            start_step(rep, now)
            if cores is not None and not e.stepping:
                next_step_end()  # the others' steps now have its share
    measured = max(1, len(ttfts))
    ttft_s = np.array(ttfts or [0.0])
    return {
        "policy": policy, "requests": len(ttfts),
        "tier_rates": {t: round(c / measured, 4) for t, c in tiers_seen.items()},
        "cold_per_request": round(sum(tiers_seen[t] for t in COLD) / measured, 4),
        "ttft_ms": {"p50": round(float(np.percentile(ttft_s, 50)) * 1000, 2),
                    "p99": round(float(np.percentile(ttft_s, 99)) * 1000, 2)},
        "imbalance_max_over_mean": round(float(served.max() / max(served.mean(), 1e-9)), 3),
        "ttft_by_tier_ms": {t: round(float(np.median(v)) * 1000, 2) for t, v in by_tier.items()},
        "wall_s": round(last_done - first_arrival, 4),
        "decode_ms_per_token_mean": round(float(np.mean(decodes)) * 1000, 3) if decodes else None,
        # open loop: 1 less the largest growth of a replica's requests in flight while the
        # measured ones arrived, as a share of those it received; about 1 when every replica
        # keeps up, falling when one's queue grows with the trace (and its p99 with it)
        "kept_up": None if cfg.concurrency else round(1 - float(max(
            ((e - b) / a for b, e, a in zip(in_flight_at_start, in_flight_at_end, arrived_measured,
                                            strict=True) if a >= 20), default=0.0)), 3),
    }

