"""The resolve benchmark runs (tiny scale) and reports what it claims to measure."""

from __future__ import annotations

import json

from benchmarks.resolve import main


def test_benchmark_runs_and_reports(capsys) -> None:
    assert main(["--tenants", "3", "--adapters", "4", "--lookups", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"] == 12
    assert report["cached"]["n"] == 50 and report["cold_through_database"]["n"] == 12
    assert report["cached"]["p99_us"] <= report["cached"]["max_us"]
