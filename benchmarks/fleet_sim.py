"""Fleet simulator: replays the replica run, then Zipf traffic at fleet sizes (the model is
benchmarks.fleet_model).

    python -m benchmarks.fleet_sim [--replicas-run benchmarks/results/replicas/replicas.json]

Its costs (engine step, per-request overhead, each tier's delay) are fitted to the replica
run's calibration phases only. Before the fleet-size table it replays the run's rounds (same
trace and configuration, vllm-router's measured consistent_hash placement, every replica's
engine sharing the machine's cores) and prints its cold loads per request and TTFT side by
side with the measurement; the table is only written when each policy's simulated cold
loads fall inside the measured rounds' range (widened by 25%) and the simulated
consistent_hash/round_robin TTFT ratios (p50, p99) fall inside the measured rounds' range.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fleet_model import (
    COLD,
    POLICIES,
    TIERS,
    Capacity,
    Config,
    Costs,
    simulate,
    zipf_trace,
)
from benchmarks.fleet_report import markdown
from benchmarks.replica_traffic import calibration_trace

REPO = Path(__file__).resolve().parents[1]


def engine_cores(run: dict[str, Any]) -> int:
    """The cores the replicas' engines compute on: vLLM on the CPU reserves one for its
    scheduler and server (VLLM_CPU_NUM_OF_RESERVED_CPU's default), the same for every
    replica on the machine."""
    return max(1, int(run["machine_cpus"]) - 1)


def _phase_config(run: dict[str, Any], phase: str, requests: int) -> Config:
    c = run["config"]
    return Config(replicas=c["replicas"], tenants=c["tenants"], per_tenant=c["per_tenant"],
                  cap=Capacity(c["max_loras"], c["max_cpu_loras"], c["tenants"] * c["per_tenant"]),
                  requests=requests, concurrency=c["concurrency"], start_on_disk=phase != "remote",
                  shared_servers=engine_cores(run))


# Replays per figure, each with its own draws of the requests' jitter (the mean is reported).
DRAWS = 5


def _simulate_phase(run: dict[str, Any], phase: str, costs: Costs) -> dict[str, Any]:
    """One calibration phase through the model (round robin, mean over ``DRAWS`` replays):
    its wall time and each tier's TTFT p50, in seconds."""
    c, cal = run["config"], run["calibration"]
    adapters = c["tenants"] * c["per_tenant"]
    trace = np.array(calibration_trace(phase, list(range(adapters)), c["replicas"], c["max_loras"],
                                       c["max_cpu_loras"], cal["requests"]))
    cfg = _phase_config(run, phase, cal["requests"])
    sims = [simulate(cfg, "round_robin", costs, trace, jitter_seed=d) for d in range(DRAWS)]
    return {"wall_s": float(np.mean([s["wall_s"] for s in sims])),
            "decode_s": float(np.mean([s["decode_ms_per_token_mean"] for s in sims])) / 1000,
            "ttft_s": {t: float(np.mean([s["ttft_by_tier_ms"].get(t, np.nan) for s in sims])) / 1000
                       for t in TIERS}}


def _solve(f: Any, target: float, lo: float, hi: float, steps: int = 40) -> float:
    """``x`` in [lo, hi] with ``f(x)`` closest to ``target``, ``f`` non-decreasing (bisection)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


# The tier each calibration phase is there to measure (its other requests are few).
PHASE_OF = {"slot_hit": "hot", "engine_hit": "engine", "disk_hit": "cold", "remote_fetch": "remote"}


def jitter_from_run(run: dict[str, Any]) -> dict[str, tuple[float, ...]]:
    """Each tier's spread, as measured: its requests' TTFTs in its calibration phase, less
    their round's median (seconds), pooled over rounds. Runs that did not record single
    requests give none."""
    jitter: dict[str, tuple[float, ...]] = {}
    for tier, phase in PHASE_OF.items():
        deviations: list[float] = []
        for f in run["calibration"]["phases"][phase]:
            ttfts = [r[3] for r in f.get("requests_seen", ()) if r[0] == tier]
            if len(ttfts) >= 8:  # a phase's stray requests of other tiers say little
                mid = float(np.median(ttfts))
                deviations += [(x - mid) / 1000 for x in ttfts]
        if deviations:
            jitter[tier] = tuple(round(d, 6) for d in deviations)
    return jitter


def decode_per_token(run: dict[str, Any], phase: str) -> float:
    """The phase's mean time per token after the first (seconds; median over its rounds),
    from the single requests the run recorded."""
    tokens = run["config"]["max_tokens"]
    per_round = []
    for f in run["calibration"]["phases"][phase]:
        if not f.get("requests_seen"):
            raise ValueError(f"the run's {phase} calibration phase recorded no single requests: "
                             "re-run `python -m benchmarks.replicas`")
        per_round.append(np.mean([(e2e - ttft) / (tokens - 1)
                                  for _, _, _, ttft, e2e in f["requests_seen"]]))
    return float(np.median(per_round)) / 1000


def costs_from_run(run: dict[str, Any]) -> Costs:
    """The model's costs, fitted to the calibration phases.

    Each phase (benchmarks/replica_traffic.py: mostly one tier's requests through round
    robin at the rounds' own concurrency) is replayed through the model: the step time is
    the one with which the hot phase takes its measured wall time and the overhead the one
    with which its slot hits' TTFT p50 is the measured one; what a load takes from its
    replica's engine (``block_s``) is the one with which the cold phase's requests take
    their measured mean time per token after the first (a load lengthens the steps running
    beside it; a remote fetch's load is a disk load's, an engine hit has none), and each
    tier's delay the one with which its TTFT p50 in its phase is the measured one. (A
    phase's wall time cannot tell the two apart: in a closed loop a load's latency
    lengthens it as much as its engine time does.) Each tier's jitter is its measured
    spread (``jitter_from_run``). The rounds are not used: reproducing them is the test."""
    phases = run["calibration"]["phases"]

    def ttft(tier: str) -> float:
        return float(np.median([f["ttft_by_tier_ms"][tier] for f in phases[PHASE_OF[tier]]
                                if tier in f["ttft_by_tier_ms"]])) / 1000

    def fit(c: Costs, what_x: str, phase: str, what: str, target: float, hi: float) -> Costs:
        """``c`` with ``what_x`` (``step_s``, ``overhead_s``, or ``delay:``/``block:`` and a
        tier) set so that the phase's ``what`` (``wall`` or a tier's TTFT p50) is ``target``."""
        def make(x: float) -> Costs:
            if what_x == "step_s":
                return replace(c, step_s=x)
            if what_x == "overhead_s":
                return replace(c, overhead_s=x)
            kind, tier = what_x.split(":")
            if kind == "block":
                return replace(c, block_s={**c.block_s, tier: x})
            return replace(c, delay_s={**c.delay_s, tier: x})

        def measure(x: float) -> float:
            sim = _simulate_phase(run, phase, make(x))
            return float(sim[f"{what}_s"] if what in ("wall", "decode") else sim["ttft_s"][what])
        return make(_solve(measure, target, 0.0, hi))

    def wall(phase: str) -> float:
        return float(np.median([f["wall_s"] for f in phases[phase]]))

    costs = Costs(wall("hot") / run["calibration"]["requests"], run["config"]["max_tokens"],
                  dict.fromkeys(TIERS, 0.0), block_s=dict.fromkeys(COLD, 0.0),
                  jitter_s=jitter_from_run(run))
    for _ in range(3):  # each fit moves the others' a little
        costs = fit(costs, "step_s", "hot", "wall", wall("hot"), 10 * costs.step_s)
        costs = fit(costs, "overhead_s", "hot", "slot_hit", ttft("slot_hit"), 5.0)
        # What a load takes from the engines shows in the steps of the requests running beside
        # it: the phase's mean time per token after the first; it cannot be more than the
        # load adds to its own request's TTFT. A remote fetch's load into the engine is a disk
        # load's (the fetch itself runs in the gateway), so the cold phase, nothing but loads,
        # measures both. An engine hit loads nothing (vLLM activates an adapter it holds
        # within the step).
        most = max(1e-3, ttft("disk_hit") - ttft("slot_hit"))
        costs = fit(costs, "block:disk_hit", "cold", "decode", decode_per_token(run, "cold"), most)
        costs = replace(costs, block_s={**costs.block_s, "remote_fetch": costs.block_s["disk_hit"]})
        for tier in TIERS[1:]:  # what it adds before its own first step: the tier's TTFT
            costs = fit(costs, f"delay:{tier}", PHASE_OF[tier], tier, ttft(tier), 5.0)
    return costs


def reproduce(run: dict[str, Any], costs: Costs) -> dict[str, Any]:
    """The replica run's trace and configuration, simulated: side by side with its figures."""
    c = run["config"]
    cfg = Config(replicas=c["replicas"], tenants=c["tenants"], per_tenant=c["per_tenant"],
                 cap=Capacity(c["max_loras"], c["max_cpu_loras"], c["tenants"] * c["per_tenant"]),
                 requests=c["requests"], zipf_s=c["zipf_s"], seed=c["seed"],
                 concurrency=c["concurrency"], start_on_disk=True, shared_servers=engine_cores(run))
    placed = {}  # the router's own consistent_hash choices, as measured
    for label, where in run["policies"]["consistent_hash"]["placement"].items():
        tenant, adapter = label.split("/")
        if len(where) != 1:
            raise ValueError(f"{label} was answered by {where} under consistent_hash, not one replica")
        placed[int(tenant[1:]) * cfg.per_tenant + int(adapter[1:])] = int(where[0][1:])
    trace = zipf_trace(cfg.tenants, cfg.per_tenant, cfg.requests, cfg.zipf_s, cfg.seed)

    def mean_ttft(sims: list[dict[str, Any]], q: str) -> float:
        return float(np.mean([s["ttft_ms"][q] for s in sims]))

    rows: dict[str, Any] = {}
    sims_by: dict[str, list[dict[str, Any]]] = {}
    for policy in ("round_robin", "consistent_hash"):
        measured = run["policies"][policy]
        sims = sims_by[policy] = [simulate(cfg, policy, costs, trace, placement=placed, jitter_seed=d)
                                  for d in range(DRAWS)]
        cold = [s["cold_per_request"] for s in sims]
        lo, hi = measured["cold_per_request"]["min"], measured["cold_per_request"]["max"]
        slack = 0.25 * max(hi, 1e-9)
        rows[policy] = {
            "measured_cold_per_request": measured["cold_per_request"],
            "simulated_cold_per_request": round(float(np.mean(cold)), 4),
            "measured_ttft_p50_ms": measured["ttft_ms"]["p50"]["median"],
            "simulated_ttft_p50_ms": round(mean_ttft(sims, "p50"), 2),
            "measured_ttft_p99_ms": measured["ttft_ms"]["p99"]["median"],
            "simulated_ttft_p99_ms": round(mean_ttft(sims, "p99"), 2),
            "within_noise": lo - slack <= float(np.mean(cold)) <= hi + slack,
            # reported, not required: the model has queueing but no outliers (the measured
            # p99 of a round is one of its slowest few requests)
            **{f"ttft_{q}_in_measured_range": measured["ttft_ms"][q]["min"] <= mean_ttft(sims, q)
               <= measured["ttft_ms"][q]["max"] for q in ("p50", "p99")}}
    # TTFT: consistent_hash / round_robin, per measured round (the two ran back to back) and
    # simulated; the simulated ratio must fall inside the measured rounds' range.
    ratios = {}
    for q in ("p50", "p99"):
        per_round = [c["ttft_ms"][q] / r["ttft_ms"][q] for c, r in zip(
            run["policies"]["consistent_hash"]["rounds"], run["policies"]["round_robin"]["rounds"],
            strict=True)]
        sim = mean_ttft(sims_by["consistent_hash"], q) / mean_ttft(sims_by["round_robin"], q)
        ratios[q] = {"measured_ratio_per_round": [round(x, 3) for x in per_round],
                   "simulated_ratio": round(sim, 3),
                   "within_noise": min(per_round) <= sim <= max(per_round)}
    return {"rows": rows, "ttft_ch_over_rr": ratios,
            "reproduced": all(r["within_noise"] for r in [*rows.values(), *ratios.values()])}


def fleet_table(costs: Costs, sizes: Sequence[tuple[int, int]], cap: Capacity,
                requests_per_replica: int, min_requests: int,
                utilizations: Sequence[float] = (0.7,)) -> list[dict[str, Any]]:
    rows = []
    for (n, m), utilization in itertools.product(sizes, utilizations):
        tenants = max(1, m // 100)
        cfg = Config(replicas=n, tenants=tenants, per_tenant=m // tenants, cap=cap,
                     requests=max(min_requests, requests_per_replica * n), warmup=0.5,
                     utilization=utilization)
        trace = zipf_trace(cfg.tenants, cfg.per_tenant, cfg.requests, cfg.zipf_s, cfg.seed)
        for policy in POLICIES:
            t0 = time.perf_counter()
            row = {"replicas": n, "adapters": cfg.adapters, "utilization": utilization,
                   **simulate(cfg, policy, costs, trace)}
            row["sim_seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"  N={n:5d} M={cfg.adapters:6d} load {utilization:.0%} {policy:15s} "
                  f"cold/req {row['cold_per_request']:.3f} "
                  f"p99 {row['ttft_ms']['p99']:9.1f} ms  imbalance {row['imbalance_max_over_mean']:.2f} "
                  f"kept up {row['kept_up']:.2f} ({row['sim_seconds']}s)", flush=True)
    return rows


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


def parse_loads(text: str) -> list[float]:
    """``0.35,0.7`` -> [0.35, 0.7] (for argparse)."""
    try:
        loads = [float(part) for part in text.split(",")]
    except ValueError:
        loads = []
    if not loads or not all(0 < x < 2 for x in loads):
        raise argparse.ArgumentTypeError(f"loads {text!r} are not fractions of capacity in (0, 2), "
                                         "comma separated (e.g. 0.35,0.7)")
    return loads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas-run", type=Path,
                        default=REPO / "benchmarks" / "results" / "replicas" / "replicas.json")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--sizes", type=parse_sizes,
                        default=parse_sizes("10x1000,100x10000,1000x10000,1000x100000"),
                        help="NxM pairs (replicas x adapters), comma separated")
    parser.add_argument("--loads", type=parse_loads, default=parse_loads("0.35,0.7"),
                        help="offered loads, fractions of the fleet's capacity in full hot batches")
    parser.add_argument("--requests-per-replica", type=int, default=500)
    parser.add_argument("--min-requests", type=int, default=40_000)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--engine", type=int, default=16)
    parser.add_argument("--disk", type=int, default=256)
    args = parser.parse_args(argv)
    if not args.replicas_run.exists():
        parser.error(f"{args.replicas_run} not found: run `python -m benchmarks.replicas` first "
                     "(the simulator must reproduce it before it reports fleet sizes)")
    run = json.loads(args.replicas_run.read_text())
    costs = costs_from_run(run)
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
                           "reproduction": repro, "fleet_capacity": asdict(cap),
                           "utilizations": args.loads,
                           "max_batch": Config(1, 1, 1, cap, 1).max_batch, "draws": DRAWS, "table": []}
    if repro["reproduced"]:
        print("== fleet sizes", flush=True)
        doc["table"] = fleet_table(costs, args.sizes, cap, args.requests_per_replica, args.min_requests,
                                   args.loads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet_sim.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "fleet_sim.md").write_text(markdown(doc))
    return 0 if repro["reproduced"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
