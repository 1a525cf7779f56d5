"""Fleet simulator: replays the replica run, then Zipf traffic at fleet sizes (the model is
benchmarks.fleet_model).

    python -m benchmarks.fleet_sim [--replicas-run benchmarks/results/replicas/replicas.json]

Before the fleet-size table it replays the replica run's own trace and configuration (with
vllm-router's measured consistent_hash placement, and every replica's engine sharing the
machine's cores, as they did) and prints its cold loads per request and TTFT side by side
with the measurement; the table is only written when each policy's simulated cold loads
fall inside the measured rounds' range (widened by 25%) and the simulated
consistent_hash/round_robin TTFT ratios (p50, p99) fall inside the measured rounds' range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fleet_model import (
    POLICIES,
    TIERS,
    Capacity,
    Config,
    Costs,
    simulate,
    zipf_trace,
)

REPO = Path(__file__).resolve().parents[1]


def costs_from_run(run: dict[str, Any]) -> Costs:
    """Service times from the replica run's per-tier TTFT medians.

    Those medians are latencies under the run's own load: its closed loop kept
    ``concurrency`` requests on ``machine_cpus`` shared cores, all busy, so by Little's law
    a request's latency is ``concurrency / cores`` times its service time. The simulator
    adds the waiting itself, so it takes the latencies scaled back by that factor (taking
    them as service times counted the wait twice: simulated TTFTs twice the measured)."""
    by_tier = run["ttft_by_tier_ms"]
    busy = min(run["machine_cpus"], run["config"]["concurrency"]) / run["config"]["concurrency"]
    hot = by_tier["slot_hit"]["p50"]
    return Costs(busy * hot / 1000, {t: busy * max(0.0, by_tier[t]["p50"] - hot) / 1000
                                     for t in TIERS if t in by_tier})


def costs_from_serving(bench: dict[str, Any]) -> Costs:
    """Hot TTFT and per-tier penalties measured one request at a time (benchmarks.serving)."""
    pen = bench["swap_penalty_ms"]
    hot = statistics.median(tier["repeat_ttft_p50_ms"] for probe in pen["detail"].values()
                            for tier in probe.values())
    return Costs(hot / 1000, {"engine_hit": pen["warm_engine"] / 1000, "disk_hit": pen["cold_disk"] / 1000,
                              "remote_fetch": pen["cold_remote"] / 1000})


def reproduce(run: dict[str, Any], costs: Costs) -> dict[str, Any]:
    """The replica run's trace and configuration, simulated: side by side with its figures."""
    c = run["config"]
    cfg = Config(replicas=c["replicas"], tenants=c["tenants"], per_tenant=c["per_tenant"],
                 cap=Capacity(c["max_loras"], c["max_cpu_loras"], c["tenants"] * c["per_tenant"]),
                 requests=c["requests"], zipf_s=c["zipf_s"], seed=c["seed"],
                 concurrency=c["concurrency"], start_on_disk=True, shared_servers=run["machine_cpus"])
    placed = {}  # the router's own consistent_hash choices, as measured
    for label, where in run["policies"]["consistent_hash"]["placement"].items():
        tenant, adapter = label.split("/")
        if len(where) != 1:
            raise ValueError(f"{label} was answered by {where} under consistent_hash, not one replica")
        placed[int(tenant[1:]) * cfg.per_tenant + int(adapter[1:])] = int(where[0][1:])
    trace = zipf_trace(cfg.tenants, cfg.per_tenant, cfg.requests, cfg.zipf_s, cfg.seed)
    rows: dict[str, Any] = {}
    sims_by: dict[str, list[dict[str, Any]]] = {}
    for policy in ("round_robin", "consistent_hash"):
        measured = run["policies"][policy]
        sims = sims_by[policy] = [simulate(cfg, policy, costs, trace, rr_offset=o, placement=placed)
                                  for o in range(cfg.replicas)]
        cold = [s["cold_per_request"] for s in sims]
        lo, hi = measured["cold_per_request"]["min"], measured["cold_per_request"]["max"]
        slack = 0.25 * max(hi, 1e-9)
        rows[policy] = {
            "measured_cold_per_request": measured["cold_per_request"],
            "simulated_cold_per_request": round(float(np.mean(cold)), 4),
            "measured_ttft_p50_ms": measured["ttft_ms"]["p50"]["median"],
            "simulated_ttft_p50_ms": round(float(np.mean([s["ttft_ms"]["p50"] for s in sims])), 2),
            "within_noise": lo - slack <= float(np.mean(cold)) <= hi + slack}
    # TTFT: consistent_hash / round_robin, per measured round (the two ran back to back) and
    # simulated; the simulated ratio must fall inside the measured rounds' range.
    ttft = {}
    for q in ("p50", "p99"):
        per_round = [c["ttft_ms"][q] / r["ttft_ms"][q] for c, r in zip(
            run["policies"]["consistent_hash"]["rounds"], run["policies"]["round_robin"]["rounds"],
            strict=True)]
        sim = float(np.mean([s["ttft_ms"][q] for s in sims_by["consistent_hash"]])
                    / np.mean([s["ttft_ms"][q] for s in sims_by["round_robin"]]))
        ttft[q] = {"measured_ratio_per_round": [round(x, 3) for x in per_round],
                   "simulated_ratio": round(sim, 3),
                   "within_noise": min(per_round) <= sim <= max(per_round)}
    return {"rows": rows, "ttft_ch_over_rr": ttft,
            "reproduced": all(r["within_noise"] for r in [*rows.values(), *ttft.values()])}


def fleet_table(costs: Costs, sizes: Sequence[tuple[int, int]], cap: Capacity,
                requests_per_replica: int, min_requests: int) -> list[dict[str, Any]]:
    rows = []
    for n, m in sizes:
        tenants = max(1, m // 100)
        cfg = Config(replicas=n, tenants=tenants, per_tenant=m // tenants, cap=cap,
                     requests=max(min_requests, requests_per_replica * n), warmup=0.5)
        trace = zipf_trace(cfg.tenants, cfg.per_tenant, cfg.requests, cfg.zipf_s, cfg.seed)
        for policy in POLICIES:
            t0 = time.perf_counter()
            row = {"replicas": n, "adapters": cfg.adapters, **simulate(cfg, policy, costs, trace)}
            row["sim_seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"  N={n:5d} M={cfg.adapters:6d} {policy:15s} cold/req {row['cold_per_request']:.3f} "
                  f"p99 {row['ttft_ms']['p99']:9.1f} ms  imbalance {row['imbalance_max_over_mean']:.2f} "
                  f"util {row['offered_utilization']:.2f} "
                  f"({row['sim_seconds']}s)", flush=True)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    def costs(c: dict[str, Any]) -> str:
        return f"hot TTFT {c['hot_s'] * 1000:.1f} ms, penalties " + ", ".join(
            f"{k} +{v * 1000:.1f} ms" for k, v in c["penalty_s"].items() if v)

    lines = ["# Fleet simulator", "", "## Reproduction of the replica run", "",
             f"Costs from the run itself ({doc['costs_source']}: per-tier TTFT medians under its "
             "load, scaled to service times by cores / requests in flight (Little's law, all "
             f"cores busy)): {costs(doc['costs'])}. Same trace, capacities and closed loop.", "",
             "| policy | cold/req measured (median [min, max]) | simulated | TTFT p50 measured ms "
             "| simulated | within noise |", "|---|---|---|---|---|---|"]
    for policy, r in doc["reproduction"]["rows"].items():
        m = r["measured_cold_per_request"]
        lines.append(f"| {policy} | {m['median']} [{m['min']}, {m['max']}] | "
                     f"{r['simulated_cold_per_request']} | {r['measured_ttft_p50_ms']} | "
                     f"{r['simulated_ttft_p50_ms']} | {r['within_noise']} |")
    lines += ["", "TTFT consistent_hash / round_robin: " + "; ".join(
        f"{q} measured per round {v['measured_ratio_per_round']}, simulated {v['simulated_ratio']} "
        f"(within noise: {v['within_noise']})" for q, v in doc["reproduction"]["ttft_ch_over_rr"].items()),
        "", f"Reproduced: {doc['reproduction']['reproduced']}.", ""]
    if not doc.get("table"):
        lines.append("The fleet table is not reported: the reproduction failed.")
        return "\n".join(lines) + "\n"
    cap = doc["fleet_capacity"]
    lines += ["## Fleet sizes", "",
              f"Costs measured one request at a time ({doc['fleet_costs_source']}): "
              f"{costs(doc['fleet_costs'])}.", "",
              f"Per replica: {cap['slots']} slots, {cap['engine']} adapters "
              f"in engine memory, {cap['disk']} on disk; open loop at {doc['utilization']:.0%} of "
              "hot capacity; second half of each trace measured.", "",
              "Offered utilization above 1: the policy's swaps cost more capacity than the fleet has, "
              "its queues grow for as long as the trace runs and its TTFT is unbounded.", "",
              "| N | M | policy | slot | engine | disk | remote | cold/req | TTFT p50 ms | p99 ms "
              "| imbalance (max/mean) | offered utilization |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["table"]:
        t = r["tier_rates"]
        lines.append(f"| {r['replicas']} | {r['adapters']} | {r['policy']} | {t['slot_hit']} | "
                     f"{t['engine_hit']} | {t['disk_hit']} | {t['remote_fetch']} | "
                     f"{r['cold_per_request']} | {r['ttft_ms']['p50']} | {r['ttft_ms']['p99']} | "
                     f"{r['imbalance_max_over_mean']} | {r['offered_utilization']} |")
    return "\n".join(lines) + "\n"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``10x1000,1000x100000`` -> [(10, 1000), (1000, 100000)] (for argparse)."""
    sizes = []
    for part in text.split(","):
        n, _, m = part.strip().partition("x")
        if not (n.isdigit() and m.isdigit() and int(n) > 0 and int(m) >= 100):
            raise argparse.ArgumentTypeError(f"size {part!r} is not NxM with N >= 1 and M >= 100 "
                                             "(e.g. 1000x100000)")
        sizes.append((int(n), int(m)))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas-run", type=Path,
                        default=REPO / "benchmarks" / "results" / "replicas" / "replicas.json")
    parser.add_argument("--serving-bench", type=Path,
                        default=REPO / "benchmarks" / "results" / "bench.json",
                        help="benchmarks.serving's results: the fleet table's per-tier costs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--sizes", type=parse_sizes,
                        default=parse_sizes("10x1000,100x10000,1000x10000,1000x100000"),
                        help="NxM pairs (replicas x adapters), comma separated")
    parser.add_argument("--requests-per-replica", type=int, default=100)
    parser.add_argument("--min-requests", type=int, default=40_000)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--engine", type=int, default=16)
    parser.add_argument("--disk", type=int, default=256)
    args = parser.parse_args(argv)
    if not args.replicas_run.exists():
        parser.error(f"{args.replicas_run} not found: run `python -m benchmarks.replicas` first "
                     "(the simulator must reproduce it before it reports fleet sizes)")
    if not args.serving_bench.exists():
        parser.error(f"{args.serving_bench} not found: run `python -m benchmarks.serving` first")
    run = json.loads(args.replicas_run.read_text())
    costs = costs_from_run(run)
    fleet_costs = costs_from_serving(json.loads(args.serving_bench.read_text()))
    print("== reproducing the replica run", flush=True)
    repro = reproduce(run, costs)
    for policy, r in repro["rows"].items():
        print(f"  {policy:15s} cold/req measured {r['measured_cold_per_request']} simulated "
              f"{r['simulated_cold_per_request']}; TTFT p50 measured {r['measured_ttft_p50_ms']} ms "
              f"simulated {r['simulated_ttft_p50_ms']} ms; within noise: {r['within_noise']}")
    for q, v in repro["ttft_ch_over_rr"].items():
        print(f"  TTFT {q} consistent_hash/round_robin: measured per round "
              f"{v['measured_ratio_per_round']}, simulated {v['simulated_ratio']}; within noise: "
              f"{v['within_noise']}", flush=True)
    cap = Capacity(args.slots, args.engine, args.disk)
    doc: dict[str, Any] = {"costs": asdict(costs), "costs_source": str(args.replicas_run.name),
                           "fleet_costs": asdict(fleet_costs),
                           "fleet_costs_source": str(args.serving_bench.name),
                           "reproduction": repro, "fleet_capacity": asdict(cap),
                           "utilization": Config(1, 1, 1, cap, 1).utilization, "table": []}
    if repro["reproduced"]:
        print("== fleet sizes", flush=True)
        doc["table"] = fleet_table(fleet_costs, args.sizes, cap, args.requests_per_replica, args.min_requests)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet_sim.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "fleet_sim.md").write_text(markdown(doc))
    return 0 if repro["reproduced"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
