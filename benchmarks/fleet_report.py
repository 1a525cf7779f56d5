"""The fleet simulator's report (benchmarks.fleet_sim): the reproduction, then the table."""

from __future__ import annotations

from typing import Any

import numpy as np

# below this, a fleet-size row is overloaded (benchmarks.fleet_model's "kept_up")
KEPT_UP = 0.9


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:+.1f}"


def markdown(doc: dict[str, Any]) -> str:
    c = doc["costs"]
    cost_line = (f"engine step {c['step_s'] * 1000:.1f} ms ({c['tokens']} per request), "
                 f"overhead {c['overhead_s'] * 1000:.1f} ms, delay before the first step "
                 + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in c["delay_s"].items() if v)
                 + ", engine time a load takes from its replica "
                 + (", ".join(f"{k} {v * 1000:.1f} ms" for k, v in c["block_s"].items() if v) or "none")
                 + "; each request's jitter drawn from its tier's measured deviations from the "
                 "median (p10 / p90) "
                 + (", ".join(f"{k} {_ms(np.percentile(v, 10))} / {_ms(np.percentile(v, 90))} ms"
                              for k, v in c["jitter_s"].items())
                    or "none (the run recorded no single requests)"))
    lines = ["# Fleet simulator", "", "## Reproduction of the replica run", "",
             f"Costs fitted to the run's calibration phases ({doc['costs_source']}; the hot phase's "
             "wall time, the cold phase's time per token after the first and each tier's TTFT p50 in its "
             "phase): " + cost_line + ". "
             "Same trace, capacities, closed loop and the router's measured placement; every "
             "replica's engine computes on the cores vLLM leaves unreserved (one here). "
             f"Simulated figures: mean over {doc['draws']} replays, each drawing its requests' "
             "jitter from the calibration's measured spread.", "",
             "| policy | cold/req measured (median [min, max]) | simulated | cold/req within noise "
             "| TTFT p50 measured ms (median) | simulated | in the rounds' range "
             "| TTFT p99 measured ms (median) | simulated | in the rounds' range |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for policy, r in doc["reproduction"]["rows"].items():
        m = r["measured_cold_per_request"]
        lines.append(f"| {policy} | {m['median']} [{m['min']}, {m['max']}] | "
                     f"{r['simulated_cold_per_request']} | {r['within_noise']} | "
                     f"{r['measured_ttft_p50_ms']} | {r['simulated_ttft_p50_ms']} | "
                     f"{r['ttft_p50_in_measured_range']} | {r['measured_ttft_p99_ms']} | "
                     f"{r['simulated_ttft_p99_ms']} | {r['ttft_p99_in_measured_range']} |")
    lines += ["", "TTFT consistent_hash / round_robin: " + "; ".join(
        f"{q} measured per round {v['measured_ratio_per_round']}, simulated {v['simulated_ratio']} "
        f"(within noise: {v['within_noise']})" for q, v in doc["reproduction"]["ttft_ch_over_rr"].items()),
        "", f"Reproduced: {doc['reproduction']['reproduced']} (required: each policy's cold loads "
        "per request, and the consistent_hash / round_robin TTFT ratios, within the measured "
        "rounds' range; absolute TTFTs are reported, not required: the model queues but has no "
        "outliers, so its p99 is below a measured one).", ""]
    if not doc.get("table"):
        lines.append("The fleet table is not reported: the reproduction failed.")
        return "\n".join(lines) + "\n"
    cap = doc["fleet_capacity"]
    lines += ["## Fleet sizes", "",
              "Costs: the calibrated ones above, which reproduced the replica run (this "
              "machine's CPU and tiny adapters: compare policies, not absolute times).", "",
              f"Per replica: {cap['slots']} slots, {cap['engine']} adapters "
              f"in engine memory, {cap['disk']} on disk, batches of up to {doc['max_batch']}; "
              "Poisson arrivals at the given load: a fraction of the fleet's capacity in full hot "
              "batches; second half of each trace measured.", "",
              "| N | M | load | policy | slot | engine | disk | remote | cold/req | TTFT p50 ms "
              "| p99 ms | imbalance (max/mean) | kept up |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["table"]:
        t = r["tier_rates"]
        # a fleet that does not keep up has no steady p99: its queues grow with the trace
        p50, p99 = ((r["ttft_ms"]["p50"], r["ttft_ms"]["p99"]) if r["kept_up"] >= KEPT_UP
                    else ("overloaded", "overloaded"))
        lines.append(f"| {r['replicas']} | {r['adapters']} | {r['utilization']:.0%} | {r['policy']} | "
                     f"{t['slot_hit']} | "
                     f"{t['engine_hit']} | {t['disk_hit']} | {t['remote_fetch']} | "
                     f"{r['cold_per_request']} | {p50} | {p99} | "
                     f"{r['imbalance_max_over_mean']} | {r['kept_up']} |")
    lines += ["", "kept up: 1 less the largest growth of a replica's requests in flight while the "
              "measured requests arrived, as a share of the requests it received; below "
              f"{KEPT_UP} a replica's queue grows with the trace "
              "at this load (hot spots, the batches' adapter limit and loads take the capacity), "
              "so the row has no steady TTFT and none is given."]
    return "\n".join(lines) + "\n"
