"""Figures of the serving benchmark: paired ratios from alternating rounds, and REPORT.md."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from loadtest.report import summarize
from loadtest.runner import PhaseResult

TARGETS = {"gateway_vs_direct": 0.98, "ttft_gateway_vs_direct": 1.05, "64_vs_1": 0.90,
           "warm_penalty_ms": 10.0, "rss_growth": 0.05}


def tok_s(phase: PhaseResult) -> float:
    return float(summarize(phase)["output_tokens_per_second"])


def ttft_p50(phase: PhaseResult) -> float:
    return float(summarize(phase)["ttft_ms"]["p50"])


def paired_ratio(rounds: Sequence[dict[str, PhaseResult]], num: str, den: str,
                 metric: str = "tok_s") -> dict[str, Any]:
    """num/den of ``metric`` (output tok/s, or TTFT p50), one ratio per round, and their median.

    Both sides of a ratio run back to back in the same round (order alternating between
    rounds), so slow spells of a shared machine hit both alike; the median of the per-round
    ratios then ignores the rounds a spell split. ``pooled`` is the metric over all rounds'
    requests together.
    """
    of = tok_s if metric == "tok_s" else ttft_p50
    per_round = [of(r[num]) / of(r[den]) for r in rounds]

    def pooled(name: str) -> float:
        return of(merge(name, [r[name] for r in rounds], 0))

    return {
        "metric": metric,
        "median": round(statistics.median(per_round), 3),
        "min": round(min(per_round), 3),
        "max": round(max(per_round), 3),
        "pooled": round(pooled(num) / pooled(den), 3),
        "per_round": [round(x, 3) for x in per_round],
        "numerator": round(pooled(num), 2),
        "denominator": round(pooled(den), 2),
    }


def merge(name: str, parts: Sequence[PhaseResult], adapters: int) -> PhaseResult:
    """Rounds of one kind as one phase over ``adapters`` targets: all records, summed time."""
    return PhaseResult(name, parts[0].scenario, adapters, sum(p.wall_seconds for p in parts),
                       [r for p in parts for r in p.records])


def _noise_caveat(ratios: dict[str, Any]) -> str:
    widest = max(x["max"] / x["min"] for x in ratios.values())
    if widest < 1.25:
        return ""
    return (f" **The rounds disagree by up to {widest:.1f}x**, far more than the 2-10% the "
            "throughput targets ask about: on this machine (the load generator, two API servers "
            "and two engines on 2 cores) those verdicts are indicative only, and a second run can "
            "land on the other side of a target.")


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


_RATIO_ROWS: tuple[tuple[str, str, str, Callable[[float], bool] | None], ...] = (
    # key, what it compares, target text, pass test (None: no target)
    ("gateway_vs_direct", "gateway / vLLM's own server, 1 adapter (output tok/s)", ">= 0.98",
     lambda x: x >= TARGETS["gateway_vs_direct"]),
    ("ttft_gateway_vs_direct", "gateway / vLLM's own server, 1 adapter (TTFT p50)", "<= 1.05",
     lambda x: x <= TARGETS["ttft_gateway_vs_direct"]),
    ("gateway_vs_direct_64", "gateway / vLLM's own server, 64 adapters (output tok/s)", "-", None),
    ("ttft_gateway_vs_direct_64", "gateway / vLLM's own server, 64 adapters (TTFT p50)", "-", None),
    ("64_vs_1", "64 distinct adapters / 1, through the gateway (tok/s)", ">= 0.90",
     lambda x: x >= TARGETS["64_vs_1"]),
    ("64_vs_1_direct", "64 distinct adapters / 1, vLLM's own server (tok/s)", "-", None),
    ("8_vs_1", "8 distinct adapters / 1, through the gateway (tok/s)", "-", None),
)


def markdown(r: dict[str, Any]) -> str:
    """The committed summary: each figure next to its target, met or missed."""
    ratios = r["ratios"]

    def ratio_cell(x: dict[str, Any]) -> str:
        return f"{x['median']:.3f} (rounds {x['min']:.2f}-{x['max']:.2f}; pooled {x['pooled']:.3f})"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:+.1f}"

    rows = [(label, ratio_cell(ratios[key]), target,
             "-" if ok is None else _verdict(ok(ratios[key]["median"])))
            for key, label, target, ok in _RATIO_ROWS if key in ratios]
    pairs = r.get("ttft_pairs")
    if pairs is not None:
        rows.insert(0, ("gateway / vLLM's own server, TTFT one request at a time, interleaved "
                        f"({pairs['pairs']} pairs)",
                        f"{pairs['ratio_of_medians']:.3f} (p50 {pairs['second_ttft_p50_ms']} vs "
                        f"{pairs['first_ttft_p50_ms']} ms; added {pairs['added_ms_median']:+.2f} ms, "
                        f"IQR {pairs['added_ms_iqr'][0]:+.2f}..{pairs['added_ms_iqr'][1]:+.2f})",
                        "<= 1.05", _verdict(pairs["ratio_of_medians"] <= TARGETS["ttft_gateway_vs_direct"])))
    pen, rss = r.get("swap_penalty_ms"), r.get("rss")
    if pen is not None:
        warm = pen["warm_engine"]
        rows += [
            ("warm swap penalty (engine memory -> batch slot), ms", ms(warm), "<= 10",
             _verdict(warm is not None and warm <= TARGETS["warm_penalty_ms"])),
            ("cold-disk swap penalty (verified local folder -> engine), ms", ms(pen["cold_disk"]), "-", "-"),
            ("cold-remote swap penalty (S3 fetch + verify -> engine), ms", ms(pen["cold_remote"]), "-",
             "-"),
        ]
    if rss is not None:
        rows.append((f"RSS growth over {rss['adapters_churned']} more distinct adapters",
                     f"{rss['growth'] * 100:+.2f}% ({rss['before_bytes'] / 2**20:.0f} -> "
                     f"{rss['after_bytes'] / 2**20:.0f} MiB)", "<= 5%",
                     _verdict(rss["growth"] <= TARGETS["rss_growth"])))
    lines = ["| benchmark | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    per_round = "\n".join(f"- {name}: {', '.join(f'{v:.3f}' for v in x['per_round'])}"
                          for name, x in ratios.items())
    text = (
        "# Serving benchmarks (generated by `python -m benchmarks.serving`)\n\n"
        f"Machine: {r['machine']['cpus']} CPU cores, {r['machine']['platform']}, Python "
        f"{r['machine']['python']}. Base: tiny-llama (fp32), vLLM on the CPU; engine settings "
        f"`{json.dumps(r['engine'])}`; {r['config']['rounds']} alternating rounds of "
        f"{r['config']['requests']} requests at concurrency {r['config']['concurrency']} "
        f"(streamed, greedy, {r['config']['max_tokens']} output tokens each).\n\n"
        + "\n".join(lines)
        + "\n\nRatios are medians of per-round ratios; both sides of each run back to back in the "
        "same round, in alternating order." + _noise_caveat(ratios)
        + "\n\nPer-round ratios:\n\n" + per_round
    )
    if pen is not None:
        text += "\n\nSwap penalties (first request on an adapter in a tier minus hot repeats):\n\n"
        text += "\n".join(
            f"- {tier}: first-request TTFT p50 {d['first_ttft_p50_ms']} ms vs hot repeats "
            f"{d['repeat_ttft_p50_ms']} ms ({d['first_requests']} first requests)"
            for probe in pen["detail"].values() for tier, d in probe.items())
    if rss is not None:
        processes = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in rss["after_by_process"].items())
        text += f"\n\nRSS after the churn by process: {processes}."
    return text + (
        "\n\nPlots: `ttft_cdf_by_tier.png` (TTFT by the tier that served the adapter), "
        "`throughput_vs_adapters.png` (1, 8, 64 distinct adapters; pooled over all rounds). Raw "
        "figures: `bench.json`; per-request records: `phases.json` (not committed: regenerated by "
        "each run).\n")
