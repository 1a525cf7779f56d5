"""Summaries, the swap penalty, and the JSON + PNG output of a load test."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from loadtest.client import RequestRecord
from loadtest.runner import PhaseResult

REPORT_FILE = "loadtest.json"
CDF_PLOT = "ttft_cdf_by_tier.png"
THROUGHPUT_PLOT = "throughput_vs_adapters.png"
HOT_TIER = "slot_hit"  # the gateway's tier for an adapter already in a batch slot


def percentiles(values: Iterable[float], ps: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    data = sorted(values)
    out: dict[str, float | None] = {}
    for p in ps:
        if not data:
            out[f"p{p}"] = None
            continue
        # nearest-rank: an observed value, never an interpolation between two
        k = max(0, min(len(data) - 1, round(p / 100 * len(data) + 0.5) - 1))
        out[f"p{p}"] = data[k]
    return out


def _ms(d: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else round(v * 1000, 2) for k, v in d.items()}


def tier_of(record: RequestRecord) -> str:
    """The gateway's tier header, or first/repeat against servers that do not send one."""
    if record.tier is not None:
        return record.tier
    return "first" if record.first_on_adapter else "repeat"


def swap_penalty(records: Sequence[RequestRecord]) -> dict[str, dict[str, float | int | None]]:
    """Median TTFT of first requests on an adapter, minus that of repeated ones, by tier.

    The baseline is the successful repeated requests of the same records: the steady state
    an adapter reaches once it is resident. Where the server names tiers (the gateway),
    only repeats it served hot (``slot_hit``) count, so a repeat that itself had to swap
    does not dilute the baseline.
    """
    ok = [r for r in records if r.ok and r.ttft is not None]
    repeated = [r for r in ok if not r.first_on_adapter]
    hot = [r for r in repeated if r.tier == HOT_TIER]
    repeats = [r.ttft for r in (hot or repeated) if r.ttft is not None]
    if not repeats:
        return {}
    baseline = statistics.median(repeats)
    by_tier: dict[str, list[float]] = {}
    for r in ok:
        if r.first_on_adapter and r.ttft is not None:
            by_tier.setdefault(tier_of(r), []).append(r.ttft)
    return {tier: {"first_requests": len(v), "first_ttft_p50_ms": round(statistics.median(v) * 1000, 2),
                   "repeat_ttft_p50_ms": round(baseline * 1000, 2),
                   "penalty_ms": round((statistics.median(v) - baseline) * 1000, 2)}
            for tier, v in sorted(by_tier.items())}


def summarize(phase: PhaseResult) -> dict[str, Any]:
    records = phase.records
    ok = [r for r in records if r.ok]
    errors = Counter(f"{r.status} {r.error}" for r in records if not r.ok)
    tokens = sum(r.completion_tokens for r in ok)
    wall = max(phase.wall_seconds, 1e-9)
    return {
        "phase": phase.name,
        "scenario": phase.scenario,
        "distinct_adapters": phase.distinct_adapters,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "top_errors": dict(errors.most_common(5)),
        "dropped_arrivals": phase.dropped,
        "wall_seconds": round(phase.wall_seconds, 3),
        "requests_per_second": round(len(ok) / wall, 3),
        "output_tokens_per_second": round(tokens / wall, 2),
        "ttft_ms": _ms(percentiles(r.ttft for r in ok if r.ttft is not None)),
        "itl_ms": _ms(percentiles(gap for r in ok for gap in r.itl)),
        "e2e_ms": _ms(percentiles(r.e2e for r in ok if r.e2e is not None)),
        "tiers": dict(Counter(tier_of(r) for r in ok)),
        "swap_penalty": swap_penalty(records),
    }


def write_report(out_dir: Path, config: dict[str, Any], phases: Sequence[PhaseResult],
                 throughput_phases: Sequence[str] | None = None) -> dict[str, Any]:
    """Write loadtest.json and the plots; returns the JSON document.

    The throughput plot uses ``throughput_phases`` (names), by default every phase, and
    is drawn when they differ in their number of distinct adapters.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "config": config,
        "phases": [summarize(p) for p in phases],
        "records": {p.name: [r.to_dict() for r in p.records] for p in phases},
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    plots = [plot_ttft_cdf(out_dir / CDF_PLOT, [r for p in phases for r in p.records])]
    sweep = [p for p in doc["phases"] if throughput_phases is None or p["phase"] in throughput_phases]
    if len({p["distinct_adapters"] for p in sweep}) > 1:
        plots.append(plot_throughput(out_dir / THROUGHPUT_PLOT, sweep))
    doc["plots"] = [str(p.name) for p in plots]
    return doc


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_ttft_cdf(path: Path, records: Sequence[RequestRecord]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_tier: dict[str, list[float]] = {}
    for r in records:
        if r.ok and r.ttft is not None:
            by_tier.setdefault(tier_of(r), []).append(r.ttft * 1000)
    for tier, values in sorted(by_tier.items()):
        values.sort()
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", label=f"{tier} (n={len(values)})")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT by adapter tier")
    ax.grid(True, which="both", alpha=0.3)
    if by_tier:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(path: Path, summaries: Sequence[dict[str, Any]]) -> Path:
    plt = _pyplot()
    points = sorted((s["distinct_adapters"], s["output_tokens_per_second"], s["requests_per_second"])
                    for s in summaries)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p[0] for p in points]
    ax.plot(xs, [p[1] for p in points], marker="o", label="output tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("distinct adapters in the run")
    ax.set_ylabel("output tokens per second")
    ax2 = ax.twinx()
    ax2.plot(xs, [p[2] for p in points], marker="s", color="tab:orange", label="requests/s")
    ax2.set_ylabel("requests per second")
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax.set_title("Throughput vs number of distinct adapters")
    ax.grid(True, alpha=0.3)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
