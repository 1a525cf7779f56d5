"""Benchmark: gateway replicas behind vllm-router, adapter affinity vs round robin, and a kill.

    python -m benchmarks.replicas [--replicas 3] [--rounds 4] [--out benchmarks/results/replicas]

On the tiny base with real vLLM: one registry on PostgreSQL (a fresh database per run),
artifacts on a real S3-protocol server (moto, loopback), ``--replicas`` ``lora-gateway
serve`` processes whose engines hold fewer adapters than the trace uses, and two real
``vllm-router`` processes on loopback in front of the same replicas: ``consistent_hash``
and ``round_robin``. The client sets the affinity key, ``X-Session-ID: <tenant>/<adapter>``
(docs/replicas.md, "Routing with vllm-router"); the gateways never read it.

1. Rounds: one Zipf trace (tenants x adapters, benchmarks.fleet_sim.zipf_trace), sent in
   a closed loop through each router in turn, the order alternating by round. Before each
   round every replica's engine memory is emptied (every adapter stays on its disk), so
   both policies start alike. Figures: cold loads per request (the replicas'
   ``x-lora-gateway-adapter-tier``: ``disk_hit`` or ``remote_fetch``) and TTFT p50/p99, as
   the median and range over rounds.
2. Kill: the trace again through ``consistent_hash``; part-way the last replica is killed
   (SIGKILL). Figures: which requests failed and with what error (only those in flight on
   it should), when the router stopped sending to it, and the fraction of adapters whose
   replica changed (only the killed replica's share should).

The router talks to the gateways directly: they accept the fields vllm-router adds to
every body at their no-op values, and name themselves on every answer
(``x-lora-gateway-replica``, from ``--replica-name``). Writes replicas.json and replicas.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.fleet_model import TIERS, zipf_trace
from benchmarks.replica_traffic import SESSION_HEADER, Sent, calibrate, drive, figures, spread
from benchmarks.serving import ADMIN_KEY, REPO, TENANT, build_adapters, start_gateway, start_s3
from loadtest.client import Target, freeze_heap
from loadtest.runner import RunSpec, admin_call
from loadtest.servers import ServerProcess, free_port, start

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
ROUTER = Path(sys.executable).with_name("vllm-router")
POLICIES = ("round_robin", "consistent_hash")
# Health probes every second, one failure marks a replica down: the window in which a
# router still sends to a dead replica is about a second (its default is 60 s x 3).
ROUTER_HEALTH = ["--health-check-interval-secs", "1", "--health-failure-threshold", "1",
                 "--health-check-timeout-secs", "1", "--worker-startup-check-interval", "1"]


@dataclass
class Replica:
    name: str
    gateway: ServerProcess

    def kill(self) -> None:
        """SIGKILL the replica, as a node failure would (no drain)."""
        if self.gateway.proc.poll() is None:
            os.killpg(self.gateway.proc.pid, signal.SIGKILL)
            self.gateway.proc.wait(30)

    def stop(self) -> None:
        self.gateway.stop()


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for this run (dropped afterwards)."""
    from sqlalchemy import create_engine, text

    name = f"lgw_replicas_{uuid.uuid4().hex[:10]}"
    admin = create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def spread_over_tenants(registry: Any, names: Sequence[str], tenants: int, per_tenant: int,
                        work: Path) -> list[Target]:
    """Re-register the bench tenant's adapters as ``tenants`` x ``per_tenant`` adapters of
    tenants t0, t1, ... (tenant-major, as zipf_trace indexes them); each keeps its own files."""
    targets = []
    for t in range(tenants):
        tenant = f"t{t}"
        registry.create_tenant(tenant)
        key = registry.create_api_key(tenant)
        for a in range(per_tenant):
            src = names[t * per_tenant + a]
            local = work / "respread" / src
            registry.fetch(registry.resolve(registry.get_tenant(TENANT), src), local)
            registry.push(tenant, f"a{a:02d}", local)
            shutil.rmtree(local)
            targets.append(Target(tenant, f"a{a:02d}", key))
    return targets


def start_replica(work: Path, index: int, base: Any, s3_url: str, database_url: str,
                  capacity: Sequence[str]) -> Replica:
    name = f"r{index}"
    folder = work / name
    folder.mkdir()
    gateway = start_gateway(folder, base, s3_url, extra=[*capacity, "--replica-name", name],
                            database_url=database_url)
    return Replica(name, gateway)


def start_replicas(args: argparse.Namespace, base: Any, s3_url: str, database_url: str,
                   capacity: Sequence[str], servers: list[Any]) -> list[Replica]:
    """All replicas, started side by side (each appended to ``servers`` once up)."""
    with ThreadPoolExecutor(args.replicas) as pool:
        futures = [pool.submit(start_replica, args.work, i, base, s3_url, database_url, capacity)
                   for i in range(args.replicas)]
        failures = []
        for future in futures:
            try:
                servers.append(future.result())
            except Exception as exc:  # the others still get stopped by the caller
                failures.append(exc)
    if failures:
        raise failures[0]
    return [s for s in servers if isinstance(s, Replica)]


def start_router(work: Path, policy: str, replicas: Sequence[Replica]) -> ServerProcess:
    port = free_port()
    cmd = [str(ROUTER), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--worker-urls", *[r.gateway.url for r in replicas], "--prometheus-port", str(free_port()),
           "--log-level", "warning", *ROUTER_HEALTH]
    return start(cmd, work / f"router-{policy}.log", port=port, ready_path="/health")


async def admin_all(replicas: Sequence[Replica], targets: Sequence[Target], op: str, **body: str) -> None:
    """One admin cache operation for every target on every live replica."""
    async with httpx.AsyncClient(timeout=300) as client:
        for r in replicas:
            spec = RunSpec(url=r.gateway.url, targets=targets, admin_key=ADMIN_KEY)
            if op == "prefetch":
                await admin_call(client, spec, op, {"adapters": [t.label for t in targets], **body})
            else:
                for t in targets:
                    await admin_call(client, spec, op, {"adapter": t.label, **body})


def kill_figures(sent: Sequence[Sent], killed_at: float, victim: str) -> dict[str, Any]:
    """Who failed and why, when the router stopped using the victim, which adapters moved."""
    failed = [s for s in sent if not s.record.ok]
    in_flight = [s for s in failed if s.record.started < killed_at]
    after = [s for s in failed if s.record.started >= killed_at]
    before_map: dict[str, set[str]] = {}
    after_map: dict[str, set[str]] = {}
    settle = killed_at + max([s.record.started - killed_at for s in after] + [0.0])
    for s in sent:
        r = s.record
        if r.ok and r.replica:
            if s.ended < killed_at:
                before_map.setdefault(r.target, set()).add(r.replica)
            elif r.started > settle:
                after_map.setdefault(r.target, set()).add(r.replica)
    both = sorted(set(before_map) & set(after_map))
    moved = [a for a in both if before_map[a] != after_map[a]]
    on_victim = [a for a in both if victim in before_map[a]]
    return {
        "victim": victim, "killed_at_s": round(killed_at, 3),
        "failed_in_flight": len(in_flight), "failed_after_kill": len(after),
        "errors": sorted({f"{s.record.status} {s.record.error}" for s in failed}),
        "last_failed_start_after_kill_s": round(settle - killed_at, 3),
        "served_by_victim_after_kill": sum(1 for s in sent if s.record.ok and s.record.replica == victim
                                           and s.record.started >= killed_at),
        "adapters_seen_before_and_after": len(both), "adapters_moved": len(moved),
        "fraction_moved": round(len(moved) / max(1, len(both)), 4),
        "victim_share_before": round(len(on_victim) / max(1, len(both)), 4),
        "moved_not_from_victim": sorted(a for a in moved if victim not in before_map[a]),
        # where the victim's adapters went (vllm-router: to one healthy worker, not ring successors)
        "moved_to": {r: sum(r in after_map[a] for a in moved) for r in sorted(set().union(
            *(after_map[a] for a in moved)))},
        "single_replica_per_adapter_before": all(len(v) == 1 for v in before_map.values()),
    }


def run(args: argparse.Namespace, servers: list[Any]) -> dict[str, Any]:
    """Start everything (appending to ``servers`` for the caller to stop), measure, report."""
    s3 = start_s3(args.work)
    servers.append(s3)
    with fresh_database() as database_url:
        count = args.tenants * args.per_tenant
        registry, _key, base, names = build_adapters(args.work, count, s3.url, database_url)
        targets = spread_over_tenants(registry, names, args.tenants, args.per_tenant, args.work)
        registry.close()
        capacity = ["--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras)]
        replicas = start_replicas(args, base, s3.url, database_url, capacity, servers)
        routers = {p: start_router(args.work, p, replicas) for p in POLICIES}
        servers.extend(routers.values())
        print(f"== {args.replicas} replicas and {len(routers)} routers up; every adapter onto "
              "every replica's disk", flush=True)
        asyncio.run(admin_all(replicas, targets, "prefetch", into="disk"))
        trace = [targets[i] for i in zipf_trace(args.tenants, args.per_tenant, args.requests,
                                                args.zipf_s, args.seed)]
        rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
        freeze_heap()
        cores = os.cpu_count() or 1

        async def reset(remote: bool) -> None:
            await admin_all(replicas, targets, "evict", **{"from": "all" if remote else "engine"})
            if not remote:
                await admin_all(replicas, targets, "prefetch", into="disk")

        print("== calibration: each tier's cost, one phase per tier (round robin)", flush=True)
        calibration = asyncio.run(calibrate(
            routers["round_robin"].url, targets, replicas=args.replicas, slots=args.max_loras,
            engine=args.max_cpu_loras, requests=args.requests, concurrency=args.concurrency,
            max_tokens=args.max_tokens, rounds=args.calibration_rounds, reset=reset))
        asyncio.run(reset(False))
        by_tier: dict[str, list[float]] = {t: [] for t in TIERS}
        # adapter -> the replicas that answered it (one each under consistent_hash)
        placement: dict[str, dict[str, set[str]]] = {p: {} for p in POLICIES}
        for r in range(args.rounds):
            for policy in POLICIES if r % 2 == 0 else POLICIES[::-1]:
                asyncio.run(admin_all(replicas, targets, "evict", **{"from": "engine"}))
                sent, _ = asyncio.run(drive(routers[policy].url, trace, args.concurrency,
                                            args.max_tokens))
                f = figures(sent)
                if f["errors"]:
                    raise RuntimeError(f"round {r} {policy}: {f['errors'][:3]}")
                rounds[policy].append(f)
                for s in sent:
                    placement[policy].setdefault(s.record.target, set()).add(s.record.replica or "?")
                    if s.record.tier in by_tier and s.record.ttft is not None:
                        by_tier[s.record.tier].append(s.record.ttft * 1000)
                print(f"  round {r} {policy:15s} cold/req {f['cold_per_request']:.3f} ttft p50 "
                      f"{f['ttft_ms']['p50']} p99 {f['ttft_ms']['p99']} ms {f['by_replica']}", flush=True)

        # The replica holding the most of the adapters the trace asks for both well before and
        # well after its middle, under the ring. Killing one whose adapters are not asked for
        # again shows nothing moving, and the killer waits for a request in flight on the
        # victim: with the fewest (a CI run: 3 of 24 requests) that came only at the trace's
        # end, and no request was left after the kill to show where anything moved.
        half, margin = len(trace) // 2, 2 * args.concurrency
        both = {t.label for t in trace[:half - margin]} & {t.label for t in trace[half + margin:]}
        share = Counter(name for label, names in placement["consistent_hash"].items()
                        if label in both for name in names if name != "?")
        victim = max(replicas, key=lambda r: share[r.name])
        print(f"== kill {victim.name} half-way through the trace (consistent_hash)", flush=True)
        asyncio.run(admin_all(replicas, targets, "evict", **{"from": "engine"}))
        sent, killed_at = asyncio.run(drive(routers["consistent_hash"].url, trace, args.concurrency,
                                            args.max_tokens, kill=(len(trace) // 2, victim)))
        kill = kill_figures(sent, killed_at, victim.name)
        print(f"  {kill}", flush=True)
    return {
        "machine_cpus": cores,
        "calibration": calibration,
        "config": {k: getattr(args, k) for k in ("replicas", "tenants", "per_tenant", "max_loras",
                                                 "max_cpu_loras", "requests", "concurrency",
                                                 "max_tokens", "zipf_s", "seed", "rounds",
                                                 "calibration_rounds")},
        "router": {"binary": "vllm-router 0.1.17", "flags": ROUTER_HEALTH,
                   "affinity_key": f"{SESSION_HEADER}: <tenant>/<adapter>"},
        "policies": {p: {"cold_per_request": spread([f["cold_per_request"] for f in rs]),
                         **{m: {q: spread([f[m][q] for f in rs]) for q in ("p50", "p99")}
                            for m in ("ttft_ms", "e2e_ms")},
                         "rounds": rs, "placement": {a: sorted(r) for a, r in sorted(placement[p].items())}}
                     for p, rs in rounds.items()},
        "ttft_by_tier_ms": {t: {"p50": round(statistics.median(v), 2), "n": len(v)}
                            for t, v in by_tier.items() if v},
        "kill": kill,
    }


def markdown(doc: dict[str, Any]) -> str:
    c, k = doc["config"], doc["kill"]
    lines = ["# Gateway replicas behind vllm-router", "",
             f"{c['replicas']} replicas (tiny base, real vLLM on CPU; {c['max_loras']} batch slots, "
             f"{c['max_cpu_loras']} adapters in engine memory each), {c['tenants']} tenants x "
             f"{c['per_tenant']} adapters, Zipf s={c['zipf_s']}, {c['requests']} requests per round, "
             f"{c['concurrency']} in flight, {c['rounds']} rounds per policy alternating; "
             f"affinity key `{doc['router']['affinity_key']}`.", "",
             "| policy | cold loads / request (median [min, max]) | TTFT p50 ms | TTFT p99 ms |",
             "|---|---|---|---|"]
    for p, v in doc["policies"].items():
        cold, p50, p99 = v["cold_per_request"], v["ttft_ms"]["p50"], v["ttft_ms"]["p99"]
        lines.append(f"| {p} | {cold['median']} [{cold['min']}, {cold['max']}] | {p50['median']} "
                     f"[{p50['min']}, {p50['max']}] | {p99['median']} [{p99['min']}, {p99['max']}] |")
    cal = doc["calibration"]
    lines += ["", "TTFT by tier (all rounds): " + ", ".join(
        f"{t} {v['p50']} ms (n={v['n']})" for t, v in doc["ttft_by_tier_ms"].items()), "",
        "TTFT p50 by tier, median over rounds: " + "; ".join(
            f"{p} " + ", ".join(f"{t} {round(statistics.median(by), 2)} ms" for t in TIERS
                                if (by := [f["ttft_by_tier_ms"][t] for f in v["rounds"]
                                           if t in f["ttft_by_tier_ms"]]))
            for p, v in doc["policies"].items()), "",
        f"Calibration ({cal['rounds']} rounds of {' / '.join(cal['phases'])} phases through round "
        "robin; benchmarks/replica_traffic.py), per phase (median over rounds): " + "; ".join(
            f"{ph} wall {statistics.median(f['wall_s'] for f in fs)} s, TTFT p50 "
            f"{statistics.median(f['ttft_ms']['p50'] for f in fs)} ms" for ph, fs in cal["phases"].items())
        + ".", "",
        f"## Kill ({k['victim']}, SIGKILL at {k['killed_at_s']} s)", "",
        f"- failed: {k['failed_in_flight']} in flight at the kill, {k['failed_after_kill']} sent after "
        f"it (the last of those started {k['last_failed_start_after_kill_s']} s after the kill)",
        f"- errors seen: {k['errors']}",
        f"- answered by {k['victim']} after the kill: {k['served_by_victim_after_kill']}",
        f"- adapters seen before and after: {k['adapters_seen_before_and_after']}; moved "
        f"{k['adapters_moved']} ({k['fraction_moved']:.0%}); {k['victim']}'s share before: "
        f"{k['victim_share_before']:.0%}; moved but not from {k['victim']}: "
        f"{k['moved_not_from_victim'] or 'none'}; moved to: {k['moved_to']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "replicas")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-replicas")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--per-tenant", type=int, default=8, help="adapters per tenant")
    parser.add_argument("--max-loras", type=int, default=2, help="batch slots per replica")
    parser.add_argument("--max-cpu-loras", type=int, default=4, help="adapters in engine memory")
    parser.add_argument("--requests", type=int, default=64, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per policy")
    parser.add_argument("--calibration-rounds", type=int, default=3,
                        help="rounds of the calibration's three phases")
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (one is killed)")
    if args.max_cpu_loras < args.concurrency:
        # A replica answers 503 when every engine slot holds an adapter in use: with affinity,
        # all requests in flight may land on one replica, each on a different adapter.
        parser.error("--max-cpu-loras must be at least --concurrency")
    if args.max_cpu_loras >= args.tenants * args.per_tenant:
        parser.error("--max-cpu-loras must be below the trace's adapters (tenants x per-tenant)")
    args.work = args.work.resolve()  # the servers run in other folders
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    servers: list[Any] = []
    started = time.perf_counter()
    try:
        doc = run(args, servers)
    finally:
        for server in reversed(servers):
            server.stop()
    doc["wall_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "replicas.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
