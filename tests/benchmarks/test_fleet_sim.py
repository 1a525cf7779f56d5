"""The fleet simulator on tiny configurations: fast, no servers."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest

from benchmarks import fleet_report, fleet_sim, replica_traffic
from benchmarks.fleet_model import (
    POLICIES,
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
    run: dict = {"machine_cpus": 2, "config": {  # the replica run's shape
        "replicas": 3, "tenants": 3, "per_tenant": 8, "max_loras": 2, "max_cpu_loras": 4,
        "requests": 64, "zipf_s": 1.1, "seed": 0, "concurrency": 4, "max_tokens": costs.tokens},
        "policies": {p: {"cold_per_request": {"median": 0.001, "min": 0.0, "max": 0.002},
                         "ttft_ms": {q: {"median": v, "min": v, "max": v}
                                     for q, v in (("p50", 20.0), ("p99", 30.0))},
                         "rounds": [{"ttft_ms": {"p50": 20.0, "p99": 30.0}}], "placement": {}}
                     for p in ("round_robin", "consistent_hash")},
        "calibration": {"requests": 64}}
    run["calibration"]["phases"] = {
        phase: [{"wall_s": sim["wall_s"],
                 "ttft_by_tier_ms": {t: v * 1000 for t, v in sim["ttft_s"].items() if v == v},
                 # one request whose time per token after the first is the phase's mean
                 "requests_seen": [["slot_hit", "r0", 0.0, 0.0,
                                    sim["decode_s"] * 1000 * (costs.tokens - 1)]]}]
        for phase in replica_traffic.CALIBRATION_PHASES
        for sim in [fleet_sim._simulate_phase(run, phase, costs)]}
    return run


def test_the_calibration_fit_recovers_the_costs_that_made_the_phases() -> None:
    truth = Costs(step_s=0.007, tokens=8, delay_s={"slot_hit": 0.0, "engine_hit": 0.005,
                                                   "disk_hit": 0.03, "remote_fetch": 0.1},
                  overhead_s=0.03, block_s={"disk_hit": 0.01, "remote_fetch": 0.01})
    fitted = fleet_sim.costs_from_run(_made_up_run(truth))
    # a load's engine time shows only in the steps of the requests running beside it
    assert "engine_hit" not in fitted.block_s
    for tier in ("disk_hit", "remote_fetch"):
        assert fitted.block_s[tier] == pytest.approx(truth.block_s[tier], rel=0.2), tier
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


def _one_replica(**kw: object) -> Config:
    base = dict(replicas=1, tenants=1, per_tenant=2, cap=Capacity(2, 2, 2), requests=400,
                concurrency=2, start_on_disk=True)
    return Config(**{**base, **kw})  # type: ignore[arg-type]


def test_a_batch_holds_at_most_max_loras_adapters() -> None:
    """Two clients on two adapters: with two batch slots their requests share steps (each
    joins one step after the other's: 5 steps a request, two at a time), with one slot
    (vLLM skips the request that would add a second adapter) they take turns, as slowly as
    one client alone."""
    costs = Costs(step_s=0.005, tokens=4, delay_s={})
    trace = np.array([0, 1] * 200)
    two = simulate(_one_replica(), "round_robin", costs, trace)
    one = simulate(_one_replica(cap=Capacity(1, 2, 2)), "round_robin", costs, trace)
    alone = simulate(_one_replica(concurrency=1), "round_robin", costs, trace)
    assert two["wall_s"] == pytest.approx(400 * 5 * 0.005 / 2)
    assert one["wall_s"] == pytest.approx(alone["wall_s"]) == pytest.approx(400 * 4 * 0.005)


def test_requests_for_an_adapter_being_loaded_wait_for_that_one_load() -> None:
    """Four clients ask for the same adapter at once: one remote fetch, the other three wait
    for it and report its tier (the gateway's single-flight load); its engine time is taken
    once."""
    costs = Costs(step_s=0.005, tokens=2, delay_s={"remote_fetch": 0.1},
                  block_s={"remote_fetch": 0.05})
    cfg = Config(replicas=1, tenants=1, per_tenant=1, cap=Capacity(1, 1, 1), requests=4,
                 concurrency=4)
    r = simulate(cfg, "round_robin", costs)
    assert r["tier_rates"]["remote_fetch"] == 1.0
    # the load's request steps alone (its block, once); the three that waited share the next
    assert r["ttft_ms"]["p50"] == pytest.approx(100 + 50 + 5 + 5)
    assert r["ttft_ms"]["p99"] < 100 + 2 * 50
    after = simulate(Config(**{**cfg.__dict__, "requests": 8}), "round_robin", costs)
    assert after["tier_rates"] == {"slot_hit": 0.5, "engine_hit": 0.0, "disk_hit": 0.0,
                                   "remote_fetch": 0.5}


def test_shared_cores_are_processor_shared() -> None:
    """Two replicas stepping on two cores run as if alone; on one core each step takes twice
    as long while the other runs, so the same trace takes twice as long."""
    cfg = Config(replicas=2, tenants=1, per_tenant=2, cap=Capacity(1, 1, 2), requests=400,
                 concurrency=2, start_on_disk=True)
    costs = Costs(step_s=0.005, tokens=4, delay_s={})
    trace = np.array([0, 1] * 200)  # round robin: adapter 0 on replica 0, 1 on 1
    alone = simulate(cfg, "round_robin", costs, trace)
    two_cores = simulate(Config(**{**cfg.__dict__, "shared_servers": 2}), "round_robin", costs, trace)
    one_core = simulate(Config(**{**cfg.__dict__, "shared_servers": 1}), "round_robin", costs, trace)
    assert two_cores["wall_s"] == pytest.approx(alone["wall_s"])
    assert one_core["wall_s"] == pytest.approx(2 * alone["wall_s"], rel=0.01)


def test_jitter_spreads_a_tiers_ttft_by_its_measured_deviations() -> None:
    cfg = _one_replica(per_tenant=1, cap=Capacity(1, 1, 1), concurrency=1, requests=2000)
    costs = Costs(step_s=0.005, tokens=1, delay_s={}, overhead_s=0.02)
    steady = simulate(cfg, "round_robin", costs)
    jittery = replace(costs, jitter_s={"slot_hit": (-0.01, 0.0, 0.03)})
    a, b = (simulate(cfg, "round_robin", jittery, jitter_seed=s) for s in (0, 1))
    assert steady["ttft_ms"]["p50"] == steady["ttft_ms"]["p99"] == pytest.approx(25.0)
    assert a["ttft_ms"]["p50"] == pytest.approx(25.0) and a["ttft_ms"]["p99"] == pytest.approx(55.0)
    assert a == simulate(cfg, "round_robin", jittery, jitter_seed=0) and a != b


def test_jitter_is_taken_from_each_tiers_own_phase() -> None:
    def phase(tier: str, ttfts: list[float]) -> dict:
        return {"requests_seen": [[tier, "r0", 0.0, t, t + 50] for t in ttfts]
                + [["disk_hit", "r0", 0.0, 500.0, 550.0]]}  # a stray of another tier
    run = {"calibration": {"phases": {
        "hot": [phase("slot_hit", [10, 20, 30, 40, 50, 60, 70, 80, 90])],
        "engine": [phase("engine_hit", [100] * 8), phase("engine_hit", [200] * 8)],
        "cold": [phase("disk_hit", [5] * 3)],  # too few to say
        "remote": [{}]}}}  # a run that recorded no single requests
    jitter = fleet_sim.jitter_from_run(run)
    assert sorted(jitter) == ["engine_hit", "slot_hit"]
    assert jitter["slot_hit"] == pytest.approx([x / 1000 for x in range(-40, 41, 10)])
    assert jitter["engine_hit"] == pytest.approx([0.0] * 16)  # each round around its own median


def test_a_fleet_or_one_replica_that_cannot_keep_up_is_told() -> None:
    light = simulate(Config(**{**SMALL.__dict__, "utilization": 0.3}), "round_robin", COSTS)
    heavy = simulate(Config(**{**SMALL.__dict__, "utilization": 3.0}), "round_robin", COSTS)
    assert light["kept_up"] > 0.97 and heavy["kept_up"] < fleet_report.KEPT_UP
    # one hot spot is enough: every request on one replica of four, at a load the fleet
    # could carry spread evenly
    spot = simulate(Config(**{**SMALL.__dict__, "utilization": 0.5}), "consistent_hash", COSTS,
                    placement=dict.fromkeys(range(SMALL.adapters), 0))
    assert spot["kept_up"] < fleet_report.KEPT_UP
