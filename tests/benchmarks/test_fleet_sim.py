"""The fleet simulator on tiny configurations: fast, no servers."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from benchmarks import fleet_sim
from benchmarks.fleet_model import POLICIES, Capacity, Config, Costs, Replica, simulate, zipf_trace

COSTS = Costs(0.015, {"engine_hit": 0.003, "disk_hit": 0.004, "remote_fetch": 0.03})
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
        assert r["requests"] == 3000 and r["ttft_ms"]["p99"] >= r["ttft_ms"]["p50"] >= 15.0


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


def test_without_a_reproduced_replica_run_no_table_is_written(tmp_path) -> None:
    # A made-up replica run whose cold loads the simulator cannot match: it must refuse.
    run = {"machine_cpus": 2, "config": {"replicas": 2, "tenants": 2, "per_tenant": 4, "max_loras": 1,
                      "max_cpu_loras": 2, "requests": 200, "zipf_s": 1.1, "seed": 0,
                      "concurrency": 2},
           "policies": {p: {"cold_per_request": {"median": 0.001, "min": 0.0, "max": 0.002},
                            "ttft_ms": {"p50": {"median": 20.0}},
                            "rounds": [{"ttft_ms": {"p50": 20.0, "p99": 30.0}}], "placement": {}}
                        for p in ("round_robin", "consistent_hash")},
           "ttft_by_tier_ms": {"slot_hit": {"p50": 15.0}, "engine_hit": {"p50": 18.0},
                               "disk_hit": {"p50": 19.0}}}
    path = tmp_path / "replicas.json"
    path.write_text(json.dumps(run))
    out = tmp_path / "out"
    serving = tmp_path / "bench.json"
    serving.write_text(json.dumps({"swap_penalty_ms": {
        "cold_remote": 30.0, "cold_disk": 3.0, "warm_engine": 3.0,
        "detail": {"warm-swap": {"engine_hit": {"repeat_ttft_p50_ms": 14.0}}}}}))
    assert fleet_sim.main(["--replicas-run", str(path), "--serving-bench", str(serving), "--out",
                           str(out), "--sizes", "4x100"]) == 1
    doc = json.loads((out / "fleet_sim.json").read_text())
    assert doc["reproduction"]["reproduced"] is False and doc["table"] == []
    assert "not reported" in (out / "fleet_sim.md").read_text()


def test_a_measured_placement_replaces_the_ring_and_shared_servers_pool_the_queue() -> None:
    everything_on_0 = {a: 0 for a in range(SMALL.adapters)}
    pinned = simulate(SMALL, "consistent_hash", COSTS, placement=everything_on_0)
    assert pinned["imbalance_max_over_mean"] == pytest.approx(SMALL.replicas)
    # four replicas' caches but one shared server: the same work queues four times deeper
    closed = Config(replicas=4, tenants=4, per_tenant=10, cap=Capacity(2, 4, 40), requests=2000,
                    concurrency=4, start_on_disk=True)
    alone = simulate(closed, "round_robin", COSTS)
    shared = simulate(Config(**{**closed.__dict__, "shared_servers": 1}), "round_robin", COSTS)
    assert shared["tier_rates"] == alone["tier_rates"]
    assert shared["ttft_ms"]["p50"] > 3 * alone["ttft_ms"]["p50"]
