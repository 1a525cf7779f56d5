"""The resolve benchmark runs (tiny scale) and reports what it claims to measure."""

from __future__ import annotations

import json

from benchmarks.resolve import main


def test_benchmark_runs_and_reports(capsys) -> None:
    assert main(["--tenants", "3", "--adapters", "4", "--lookups", "50", "--in-use", "8",
                 "--steady-s", "1.2", "--ttl", "0.3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"] == 12
    assert report["cached"]["n"] == 50 and report["cold_through_database"]["n"] == 12
    assert report["cached"]["p99_us"] <= report["cached"]["max_us"]
    steady = report["steady"]
    assert steady["in_use"] == 8
    # by the TTL alone every name in use is read again about every half-TTL; the watch reads
    # one counter every third of a TTL instead
    assert steady["ttl_only"]["registry_reads_per_s"] > 8 / 0.3
    assert steady["generation_watch"]["registry_reads_per_s"] < 0.5 * 8 / 0.3
