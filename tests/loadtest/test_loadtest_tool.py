"""`lora-gateway loadtest` against a real HTTP gateway (uvicorn, real registry, fake engine).

The real-vLLM run is in tests/integration/test_e2e_tiny.py; here every scenario, both
loops, the bounds and the report run in seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from gateway.app import create_app
from loadtest import cli as loadtest_cli
from loadtest.client import RequestRecord
from loadtest.report import swap_penalty
from lora_gateway.cli import build_parser
from tests.gateway.conftest import make_settings, serving
from tests.gateway.fakes import FakeEngine

ADMIN_KEY = "k" * 40


@pytest.fixture
def server(registry_env, tmp_path) -> Iterator[str]:
    settings = make_settings(registry_env, tmp_path, admin_api_key=ADMIN_KEY, max_cpu_loras=4,
                             max_loras=1)
    with serving(create_app(settings, engine_factory=lambda _s: FakeEngine())) as url:
        yield url


@pytest.fixture
def targets_file(registry_env, tmp_path) -> Path:
    path = tmp_path / "targets.yaml"
    keys = registry_env.keys
    path.write_text(yaml.safe_dump({"targets": [
        {"tenant": "acme", "model": "support-bot", "api_key": keys["acme"]},
        {"tenant": "globex", "model": "pirate", "api_key": keys["globex"]},
    ]}))
    return path


def run_cli(*argv: str) -> int:
    args = build_parser().parse_args(["loadtest", *argv])
    return loadtest_cli.run(args)


def test_cold_remote_then_warm_report_tiers_and_swap_penalty(server, targets_file, tmp_path) -> None:
    out = tmp_path / "cold"
    rc = run_cli("--url", server, "--targets", str(targets_file), "--admin-key", ADMIN_KEY,
                 "--scenario", "cold-remote", "--max-requests", "6", "--out", str(out))
    assert rc == 0
    doc = json.loads((out / "loadtest.json").read_text())
    phase = doc["phases"][0]
    assert phase["requests"] == 6 and phase["errors"] == 0
    records = doc["records"]["cold-remote"]
    firsts = [r for r in records if r["first_on_adapter"]]
    assert [r["tier"] for r in firsts] == ["remote_fetch"] * 3  # each evicted from disk first
    assert {r["tier"] for r in records if not r["first_on_adapter"]} == {"slot_hit"}
    assert set(phase["swap_penalty"]) == {"remote_fetch"}
    assert phase["swap_penalty"]["remote_fetch"]["first_requests"] == 3
    assert (out / "ttft_cdf_by_tier.png").stat().st_size > 1000
    assert ADMIN_KEY not in (out / "loadtest.json").read_text()  # secrets stay out of reports

    rc = run_cli("--url", server, "--targets", str(targets_file), "--admin-key", ADMIN_KEY,
                 "--scenario", "cold-disk", "--max-requests", "4", "--out", str(tmp_path / "disk"))
    assert rc == 0
    disk = json.loads((tmp_path / "disk" / "loadtest.json").read_text())
    assert [r["tier"] for r in disk["records"]["cold-disk"] if r["first_on_adapter"]] == ["disk_hit"] * 2


def test_warm_swap_cycles_adapters_through_the_batch_slots(server, targets_file, tmp_path) -> None:
    # the test gateway has max_loras=1: each visit to the other adapter swaps it into the slot
    out = tmp_path / "warm"
    rc = run_cli("--url", server, "--targets", str(targets_file), "--admin-key", ADMIN_KEY,
                 "--scenario", "warm-swap", "--max-requests", "9", "--cold-repeats", "2",
                 "--out", str(out))
    assert rc == 0
    doc = json.loads((out / "loadtest.json").read_text())
    records = doc["records"]["warm-swap"]
    assert [r["tier"] for r in records if r["first_on_adapter"]] == ["engine_hit"] * 3
    assert {r["tier"] for r in records if not r["first_on_adapter"]} == {"slot_hit"}
    assert [r["target"] for r in records][::3] == ["acme/support-bot", "globex/pirate", "acme/support-bot"]
    assert set(doc["phases"][0]["swap_penalty"]) == {"engine_hit"}


def test_warm_swap_needs_more_adapters_than_slots(server, registry_env, tmp_path, capsys) -> None:
    rc = run_cli("--url", server, "--api-key", registry_env.keys["acme"], "--tenant", "acme",
                 "--model", "support-bot", "--admin-key", ADMIN_KEY, "--scenario", "warm-swap",
                 "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "more distinct targets than the gateway's 1 batch slots" in capsys.readouterr().err


def test_swap_penalty_baseline_is_the_hot_repeats() -> None:
    def rec(tier: str, first: bool, ttft: float) -> RequestRecord:
        return RequestRecord("t/a", "p", 0.0, status=200, tier=tier, first_on_adapter=first, ttft=ttft)

    records = [rec("engine_hit", True, 0.030), rec("slot_hit", False, 0.010), rec("slot_hit", False, 0.012),
               rec("engine_hit", False, 0.500)]  # a repeat that itself swapped: not the baseline
    penalty = swap_penalty(records)
    assert penalty == {"engine_hit": {"first_requests": 1, "first_ttft_p50_ms": 30.0,
                                      "repeat_ttft_p50_ms": 11.0, "penalty_ms": 19.0}}
    # servers without tiers: first vs every repeat
    plain = [replace(r, tier=None) for r in records]
    assert swap_penalty(plain)["first"]["repeat_ttft_p50_ms"] == 12.0


def test_open_loop_zipf_sweep_is_bounded_and_plots_throughput(server, targets_file, tmp_path) -> None:
    out = tmp_path / "zipf"
    started = time.monotonic()
    rc = run_cli("--url", server, "--targets", str(targets_file), "--scenario", "zipf",
                 "--mode", "open", "--rate", "20", "--duration", "1.5", "--max-requests", "1000",
                 "--sweep-adapters", "1,2", "--out", str(out))
    assert rc == 0
    assert time.monotonic() - started < 20
    doc = json.loads((out / "loadtest.json").read_text())
    assert [p["phase"] for p in doc["phases"]] == ["zipf-1", "zipf-2"]
    for p in doc["phases"]:
        assert p["errors"] == 0
        assert 15 <= p["requests"] <= 31, p  # ~20/s for 1.5 s: bounded by time, not count
        assert p["output_tokens_per_second"] > 0 and p["ttft_ms"]["p50"] is not None
    assert doc["phases"][0]["distinct_adapters"] == 1
    assert doc["phases"][1]["distinct_adapters"] == 2
    assert (out / "throughput_vs_adapters.png").stat().st_size > 1000


def test_closed_loop_mixed_tenants_bounded_by_count(server, targets_file, tmp_path) -> None:
    out = tmp_path / "mix"
    rc = run_cli("--url", server, "--targets", str(targets_file), "--scenario", "tenants",
                 "--concurrency", "3", "--max-requests", "12", "--duration", "60", "--out", str(out))
    assert rc == 0
    phase = json.loads((out / "loadtest.json").read_text())["phases"][0]
    assert phase["requests"] == 12 and phase["ok"] == 12
    assert phase["itl_ms"]["p50"] is not None and phase["e2e_ms"]["p99"] is not None


def test_errors_are_counted_not_raised(server, registry_env, tmp_path) -> None:
    out = tmp_path / "err"
    rc = run_cli("--url", server, "--api-key", registry_env.keys["acme"], "--tenant", "acme",
                 "--model", "pirate", "--max-requests", "3", "--out", str(out))
    assert rc == 1  # no request succeeded
    phase = json.loads((out / "loadtest.json").read_text())["phases"][0]
    assert phase["errors"] == 3 and "404" in next(iter(phase["top_errors"]))


@pytest.mark.parametrize(("argv", "message"), [
    (["--scenario", "cold-disk", "--model", "support-bot", "--api-key", "x"], "--admin-key"),
    (["--scenario", "tenants", "--model", "support-bot", "--api-key", "x"], "two tenants"),
    (["--model", "support-bot"], "--api-key"),
    (["--model", "a", "--api-key", "x", "--sweep-adapters", "1,5"], "within 1..1"),
    ([], "no targets"),
])
def test_bad_invocations_are_clear_errors(argv, message, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LGW_ADMIN_API_KEY", raising=False)
    monkeypatch.delenv("LGW_LOADTEST_API_KEY", raising=False)
    assert run_cli("--url", "http://127.0.0.1:9", *argv) == 2
    assert message in capsys.readouterr().err
