"""Benchmark: N distinct cold adapters requested at once, loads serialised vs parallel.

    python -m benchmarks.cold_loads [--adapters 16] [--rounds 6] [--before-tree PATH]

On the tiny base with real vLLM and the registry's artifacts on a real S3-protocol
server (moto, loopback), two gateways run side by side: "before" and "after". Each
round, per gateway and per tier, every adapter is evicted (from engine memory for
``disk``, from engine memory and local disk for ``remote``), then one request per
adapter is sent at once; the figure is the wall time until the last answer. Sides
alternate their order every round; the report gives medians and the spread.

"before" is the same gateway with ``--adapter-load-concurrency 1`` (every cold load
behind one lock, as it was), or, with ``--before-tree``, the gateway of another
checkout run unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serving import ADMIN_KEY, REPO, TENANT, build_adapters, start_gateway, start_s3
from loadtest.client import RequestRecord, RequestShape, Target, send
from loadtest.servers import ServerProcess

TIERS = {"disk": "engine", "remote": "all"}  # what is evicted before each burst


async def burst(url: str, targets: list[Target], evict: str) -> dict[str, Any]:
    """Evict every target, then one request each, all at once: wall seconds and tiers."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256)) as client:
        for t in targets:
            r = await client.post(f"{url}/admin/v1/cache/evict", headers=admin,
                                  json={"adapter": f"{t.tenant}/{t.model}", "from": evict})
            if r.status_code != 200:
                raise RuntimeError(f"evict {t.model}: {r.status_code} {r.text[:200]}")
        started = time.perf_counter()
        records = await asyncio.gather(*[
            send(client, url, t, RequestShape(max_tokens=4),
                 RequestRecord(t.label, "burst", 0.0, first_on_adapter=True)) for t in targets])
        wall = time.perf_counter() - started
    failed = [f"{r.status} {r.error}" for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) failed: {failed[:3]}")
    tiers = sorted({r.tier or "?" for r in records})
    return {"wall_s": wall, "tiers": tiers}


def summarize(walls: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(walls), 4), "min_s": round(min(walls), 4),
            "max_s": round(max(walls), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=16, help="distinct cold adapters per burst")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--before-tree", type=Path, help="checkout whose gateway is 'before'")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cold_loads.json")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-cold")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()  # the servers run in other folders
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    servers: list[ServerProcess] = [start_s3(args.work)]
    try:
        registry, key, base, names = build_adapters(args.work, args.adapters, servers[0].url)
        registry.close()
        targets = [Target(TENANT, n, key) for n in names]
        sides: dict[str, ServerProcess] = {}
        for side, tree, extra in (
            ("before", args.before_tree or REPO,
             [] if args.before_tree else ["--adapter-load-concurrency", "1"]),
            ("after", REPO, []),
        ):
            work = args.work / side
            work.mkdir()
            shutil.copy(args.work / "registry.db", work / "registry.db")  # same rows, own file
            sides[side] = start_gateway(work, base, servers[0].url, tree, extra)
            servers.append(sides[side])
        for server in sides.values():  # every adapter fetched once: the disk tier has them all
            asyncio.run(burst(server.url, targets, "all"))
        walls: dict[str, dict[str, list[float]]] = {s: {t: [] for t in TIERS} for s in sides}
        seen_tiers: dict[str, dict[str, list[str]]] = {s: {} for s in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for side in order:
                for tier, evict in TIERS.items():
                    result = asyncio.run(burst(sides[side].url, targets, evict))
                    expected = "disk_hit" if tier == "disk" else "remote_fetch"
                    if result["tiers"] != [expected]:
                        raise RuntimeError(f"{side} {tier} burst was served from {result['tiers']}")
                    walls[side][tier].append(result["wall_s"])
                    seen_tiers[side][tier] = result["tiers"]
                    print(f"  round {r} {side} {tier}: {result['wall_s'] * 1000:.0f} ms "
                          f"({', '.join(result['tiers'])})", flush=True)
        report = {"adapters": args.adapters, "rounds": args.rounds,
                  "before": str(args.before_tree) if args.before_tree else "adapter_load_concurrency=1",
                  "tiers_seen": seen_tiers, "figures": {}}
        for tier in TIERS:
            ratios = [b / a for b, a in zip(walls["before"][tier], walls["after"][tier], strict=True)]
            report["figures"][tier] = {
                "before": summarize(walls["before"][tier]), "after": summarize(walls["after"][tier]),
                "speedup_median": round(statistics.median(ratios), 3),
                "speedup_rounds": [round(x, 3) for x in ratios]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["figures"], indent=2))
        return 0
    finally:
        for server in reversed(servers):
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
