"""The fleet simulator on tiny configurations: fast, no servers."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from benchmarks import fleet_sim, replica_traffic
from benchmarks.fleet_model import (
    POLICIES,
    TIERS,
    Capacity,
    Config,
    Costs,
    Replica,
    simulate,
    zipf_trace,
)
from loadtest.client import Target

COSTS = Costs(step_s=0.005, tokens=4, delay_s={"engine_hit": 0.003, "disk_hit": 0.004,
                                               "remote_fetch": 0.03})
SMALL = Config(replicas=4, tenants=4, per_tenant=10, cap=Capacity(2, 4, 40), requests=4000,
               warmup=0.25)


def test_zipf_trace_is_seeded_skewed_and_in_range() -> None:
    a = zipf_trace(4, 10, 5000, 1.1, seed=3)
    assert np.array_equal(a, zipf_trace(4, 10, 5000, 1.1, seed=3))
    assert not np.array_equal(a, zipf_trace(4, 10, 5000, 1.1, seed=4))
    assert a.min() >= 0 and a.max() < 40
    counts = np.sort(np.bincount(a, minlength=40))[::-1]
    assert counts[0] > 5 * counts[20]  # a few adapters take most of the traffic


def test_replica_tiers_are_lru_and_report_the_highest_holder() -> None:
    r = Replica(Capacity(slots=1, engine=2, disk=3))
    assert [r.serve(a)[0] for a in (0, 0, 1, 0, 2)] == [
        "remote_fetch", "slot_hit", "remote_fetch", "engine_hit", "remote_fetch"]
    # engine holds {0, 2} now (1 was least recently used); disk still has 1
    assert r.serve(1) == ("disk_hit", 0)


def test_affinity_beats_round_robin_when_one_replica_cannot_hold_every_adapter() -> None:
    results = {p: simulate(SMALL, p, COSTS) for p in POLICIES}
    rr = results["round_robin"]
    for policy in ("consistent_hash", "bounded_load", "gie"):
        assert results[policy]["cold_per_request"] < rr["cold_per_request"], policy
        assert results[policy]["tier_rates"]["slot_hit"] > rr["tier_rates"]["slot_hit"], policy
    assert rr["imbalance_max_over_mean"] == pytest.approx(1.0, abs=0.01)
    for r in results.values():
        assert sum(r["tier_rates"].values()) == pytest.approx(1.0, abs=1e-3)
        assert r["requests"] == 3000 and r["ttft_ms"]["p99"] >= r["ttft_ms"]["p50"] >= 5.0


def test_bounded_load_caps_the_hot_spot_that_plain_hashing_creates() -> None:
    hot = Config(replicas=8, tenants=2, per_tenant=10, cap=Capacity(2, 4, 20), requests=6000,
                 zipf_s=1.4, utilization=0.8, warmup=0.25)
    plain = simulate(hot, "consistent_hash", COSTS)
    bounded = simulate(hot, "bounded_load", COSTS)
    assert bounded["imbalance_max_over_mean"] < plain["imbalance_max_over_mean"]
    assert bounded["ttft_ms"]["p99"] < plain["ttft_ms"]["p99"]


def test_unknown_policy_and_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        simulate(SMALL, "random", COSTS)
    assert fleet_sim.parse_sizes("10x1000, 1000x100000") == [(10, 1000), (1000, 100000)]
    with pytest.raises(argparse.ArgumentTypeError, match="NxM"):
        fleet_sim.parse_sizes("10by1000")


def _made_up_run(costs: Costs) -> dict:
    """A replica run whose calibration phases are what the model gives with ``costs``, and
    whose rounds no model could give (next to no cold loads under round robin)."""
    run: dict = {"machine_cpus": 2, "config": {
        "replicas": 2, "tenants": 2, "per_tenant": 4, "max_loras": 1, "max_cpu_loras": 2,
        "requests": 200, "zipf_s": 1.1, "seed": 0, "concurrency": 2, "max_tokens": costs.tokens},
        "policies": {p: {"cold_per_request": {"median": 0.001, "min": 0.0, "max": 0.002},
                         "ttft_ms": {q: {"median": v, "min": v, "max": v}
                                     for q, v in (("p50", 20.0), ("p99", 30.0))},
                         "rounds": [{"ttft_ms": {"p50": 20.0, "p99": 30.0}}], "placement": {}}
                     for p in ("round_robin", "consistent_hash")},
        "calibration": {"requests": 48, "demand_s": {  # whose differences give costs.block_s
            t: 0.1 + 2 * costs.block_s.get(t, 0.0) for t in TIERS}}}
    run["calibration"]["phases"] = {
        phase: [{"wall_s": sim["wall_s"],
                 "ttft_by_tier_ms": {t: v * 1000 for t, v in sim["ttft_s"].items() if v == v}}]
        for phase in replica_traffic.CALIBRATION_PHASES
        for sim in [fleet_sim._simulate_phase(run, phase, costs)]}
    return run


def test_the_calibration_fit_recovers_the_costs_that_made_the_phases() -> None:
    truth = Costs(step_s=0.02, tokens=4, delay_s={"slot_hit": 0.0, "engine_hit": 0.01,
                                                  "disk_hit": 0.05, "remote_fetch": 0.3},
                  overhead_s=0.015, block_s={"disk_hit": 0.004, "remote_fetch": 0.01})
    fitted = fleet_sim.costs_from_run(_made_up_run(truth))
    assert fitted.block_s == pytest.approx({"engine_hit": 0.0, **truth.block_s})
    assert fitted.step_s == pytest.approx(truth.step_s, rel=0.05)
    assert fitted.overhead_s == pytest.approx(truth.overhead_s, abs=0.005)
    for tier in ("disk_hit", "remote_fetch"):
        assert fitted.delay_s[tier] == pytest.approx(truth.delay_s[tier], abs=0.01), tier


def test_without_a_reproduced_replica_run_no_table_is_written(tmp_path) -> None:
    path = tmp_path / "replicas.json"
    path.write_text(json.dumps(_made_up_run(COSTS)))
    out = tmp_path / "out"
    assert fleet_sim.main(["--replicas-run", str(path), "--out", str(out), "--sizes", "4x100"]) == 1
    doc = json.loads((out / "fleet_sim.json").read_text())
    assert doc["reproduction"]["reproduced"] is False and doc["table"] == []
    assert "not reported" in (out / "fleet_sim.md").read_text()


def test_a_measured_placement_replaces_the_ring_and_shared_servers_pool_the_queue() -> None:
    everything_on_0 = {a: 0 for a in range(SMALL.adapters)}
    pinned = simulate(SMALL, "consistent_hash", COSTS, placement=everything_on_0)
    assert pinned["imbalance_max_over_mean"] == pytest.approx(SMALL.replicas)
    # four replicas' caches but one shared core: their steps take up to four times longer
    closed = Config(replicas=4, tenants=4, per_tenant=10, cap=Capacity(2, 4, 40), requests=2000,
                    concurrency=4, start_on_disk=True)
    alone = simulate(closed, "round_robin", COSTS)
    shared = simulate(Config(**{**closed.__dict__, "shared_servers": 1}), "round_robin", COSTS)
    assert shared["tier_rates"] == alone["tier_rates"]
    assert shared["ttft_ms"]["p50"] > 2 * alone["ttft_ms"]["p50"]


def test_a_replica_batches_the_requests_it_holds() -> None:
    """One replica, one adapter: four clients get through the trace in about a quarter of
    the time one does (they share steps; a request that arrives mid-step waits for the
    next), not in the same time as with one request per step."""
    one = Config(replicas=1, tenants=1, per_tenant=1, cap=Capacity(1, 1, 1), requests=400,
                 concurrency=1, start_on_disk=True)
    four = Config(**{**one.__dict__, "concurrency": 4})
    solo, batched = simulate(one, "round_robin", COSTS), simulate(four, "round_robin", COSTS)
    assert solo["wall_s"] / 4 <= batched["wall_s"] < solo["wall_s"] / 3


def test_calibration_fit_recovers_each_tiers_demand() -> None:
    """Phases of known tier mixes whose wall times follow known demands: the fit returns them."""
    demand = dict(zip(TIERS, (0.05, 0.08, 0.2, 0.5), strict=True))
    mixes = [(60, 4, 0, 0), (10, 50, 4, 0), (2, 6, 56, 0), (1, 3, 36, 24), (58, 6, 0, 0)]
    phases = [{"ok": 64, "tiers": dict(zip(TIERS, mix, strict=True)),
               "wall_s": sum(n * demand[t] for t, n in zip(TIERS, mix, strict=True)) / 2}
              for mix in mixes]
    fitted = replica_traffic.fit_tier_demands(phases, cores=2)
    assert fitted == pytest.approx(demand, rel=1e-6)


def test_calibration_traces_give_each_replica_the_adapters_its_phase_needs() -> None:
    targets = [Target("t0", f"a{i:02d}", "k") for i in range(24)]

    def per_replica(phase: str) -> list[set[str]]:
        trace = replica_traffic.calibration_trace(phase, targets, 3, slots=2, engine=4, requests=64)
        return [{t.label for t in trace[r::3]} for r in range(3)]

    assert [len(s) for s in per_replica("hot")] == [1, 1, 1]
    assert [len(s) for s in per_replica("engine")] == [3, 3, 3]  # one more than its 2 slots
    assert [len(s) for s in per_replica("cold")] == [5, 5, 5]  # one more than its engine's 4
    assert [len(s) for s in per_replica("remote")] == [8, 8, 8]
    with pytest.raises(ValueError, match="needs 30 adapters"):
        replica_traffic.calibration_trace("cold", targets, 3, slots=2, engine=9, requests=64)


def test_a_load_that_blocks_the_engine_delays_every_request_on_the_replica() -> None:
    """``block_s``: add_lora runs between the engine's steps, so the hot requests sharing
    the replica wait for it too; without it only the loading request is delayed."""
    cfg = Config(replicas=1, tenants=1, per_tenant=8, cap=Capacity(1, 1, 8), requests=2000,
                 concurrency=4, start_on_disk=True, seed=3)
    free = simulate(cfg, "round_robin", COSTS)
    blocking = simulate(cfg, "round_robin", Costs(COSTS.step_s, COSTS.tokens, COSTS.delay_s,
                                                  block_s={"disk_hit": 0.02}))
    assert free["tier_rates"] == blocking["tier_rates"] and free["tier_rates"]["slot_hit"] > 0
    assert blocking["ttft_by_tier_ms"]["slot_hit"] > free["ttft_by_tier_ms"]["slot_hit"]
    assert blocking["wall_s"] > free["wall_s"]
