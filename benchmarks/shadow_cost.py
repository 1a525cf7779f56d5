"""What a rollout's shadow comparisons cost the stable version's callers: time to first
token of the requests the stable version serves, with shadows off and at each
``--percents`` share, on the real engine (tiny-llama base, CPU vLLM).

    python -m benchmarks.shadow_cost [--rounds 4] [--requests 48] [--concurrency 1,4]
                                     [--percents 0,5,100] [--out benchmarks/results/rollouts/shadow_cost]

One gateway (the benchmark's engine settings, ``benchmarks.serving.ENGINE``, as
``lora-gateway serve`` runs them) serves adapter ``a0000`` whose ``prod`` alias is under a
rollout at 5 % (v1 stable, v2 candidate; decisions off, so the split holds). Each round
runs every share once, in an order that rotates round by round: the rollout is started
again with that ``shadow_percent`` (the alias resolution is refreshed within the gateway's
resolve TTL), then ``--requests`` streamed chat requests at each concurrency, every one a
new ``user`` (the split's sticky key), ``max_tokens`` 32, temperature 0, on kept-alive
connections; only those the stable version served count. Per share and concurrency:
TTFT p50 and p90, the median over rounds and the spread, and the ratio to shadows off
within each round; and how many comparisons ran and were skipped (spare capacity only).
Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from adapters_registry import ConflictError, RolloutRules
from benchmarks.serving import ADMIN_KEY, REPO, TENANT, build_adapters, start_gateway, start_s3
from benchmarks.stage_trace import has_content
from loadtest.servers import ServerProcess

ADAPTER = "a0000"
RESOLVE_TTL_S = 0.5
PROMPT = "Write one sentence about the sea."


async def one(client: httpx.AsyncClient, url: str, key: str, user: str) -> tuple[str, float]:
    """One streamed request: the version that served it and the client's TTFT in ms."""
    body = {"model": ADAPTER, "user": user, "max_tokens": 32, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": PROMPT}]}
    t0 = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        version = resp.headers.get("x-lora-gateway-adapter-version", "")
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {") and has_content(line.encode()):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"no content in the answer to {user}")
    return version, (first - t0) * 1000


async def load(url: str, key: str, tag: str, requests: int, concurrency: int) -> list[float]:
    """``requests`` requests, ``concurrency`` at a time: the stable version's TTFTs."""
    out: list[float] = []
    queue = list(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            version, ttft = await one(client, url, key, f"{tag}-{i}")
            if version.endswith("@v1"):
                out.append(ttft)

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return out


def shadow_counts(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    resp = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    resp.raise_for_status()
    for line in resp.text.splitlines():
        if line.startswith("lgw_shadow_comparisons_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            counts[outcome] = counts.get(outcome, 0.0) + float(line.split()[-1])
    return counts


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48, help="requests per share, round and load")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--percents", default="0,5,100", help="shadow shares to compare (0: off)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-shadow")
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "results" / "rollouts" / "shadow_cost")
    args = parser.parse_args(argv)
    percents = [float(p) for p in args.percents.split(",")]
    loads = [int(c) for c in args.concurrency.split(",")]
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    servers: list[ServerProcess] = []
    try:
        s3 = start_s3(args.work)
        servers.append(s3)
        registry, key, base, names = build_adapters(args.work, 2, s3.url)
        second = args.work / "second"
        registry.fetch(registry.resolve(registry.get_tenant(TENANT), names[1]), second)
        registry.push(TENANT, ADAPTER, second)  # v2: the candidate
        gateway = start_gateway(args.work, base, s3.url, extra=[
            "--rollout-decide-seconds", "0", "--resolve-ttl-seconds", str(RESOLVE_TTL_S)])
        servers.append(gateway)
        asyncio.run(load(gateway.url, key, "warm", 16, 4))
        samples: dict[tuple[float, int], list[list[float]]] = {}
        shadows: dict[float, dict[str, float]] = {p: {} for p in percents}
        for r in range(args.rounds):
            order = percents[r % len(percents):] + percents[:r % len(percents)]
            for p in order:
                with contextlib.suppress(ConflictError):  # none running yet
                    registry.rollouts.abort(TENANT, ADAPTER, "prod")
                registry.rollouts.start(TENANT, ADAPTER, "prod", 2, [5, 100], RolloutRules(
                    min_requests=1_000_000, min_step_seconds=0, shadow_percent=p))
                time.sleep(RESOLVE_TTL_S * 4)
                before = shadow_counts(gateway.url)
                for c in loads:
                    ttfts = asyncio.run(load(gateway.url, key, f"r{r}-p{p}-c{c}", args.requests, c))
                    samples.setdefault((p, c), []).append(ttfts)
                time.sleep(2.0)  # shadows still running finish inside their own share's time
                after = shadow_counts(gateway.url)
                for outcome, n in after.items():
                    shadows[p][outcome] = shadows[p].get(outcome, 0) + n - before.get(outcome, 0)
                print(f"round {r} shadow {p:g}%: " + ", ".join(
                    f"c{c} p50 {statistics.median(samples[(p, c)][-1]):.1f} ms" for c in loads),
                    flush=True)
        result = summarize(samples, shadows, percents, loads, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
    finally:
        for server in reversed(servers):
            server.stop()
    return 0


def summarize(samples: dict[tuple[float, int], list[list[float]]],
              shadows: dict[float, dict[str, float]], percents: list[float], loads: list[int],
              args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for c in loads:
        for p in percents:
            rounds = samples[(p, c)]
            p50 = [statistics.median(x) for x in rounds]
            p90 = [pct(x, 0.9) for x in rounds]
            off50 = [statistics.median(x) for x in samples[(percents[0], c)]]
            off90 = [pct(x, 0.9) for x in samples[(percents[0], c)]]
            ratio50 = [a / b for a, b in zip(p50, off50, strict=True)]
            ratio90 = [a / b for a, b in zip(p90, off90, strict=True)]
            rows.append({"concurrency": c, "shadow_percent": p,
                         "stable_requests": sum(len(x) for x in rounds),
                         "ttft_p50_ms": round(statistics.median(p50), 1),
                         "ttft_p50_spread": [round(min(p50), 1), round(max(p50), 1)],
                         "ttft_p90_ms": round(statistics.median(p90), 1),
                         "p50_ratio": round(statistics.median(ratio50), 3),
                         "p50_ratio_spread": [round(min(ratio50), 3), round(max(ratio50), 3)],
                         "p90_ratio": round(statistics.median(ratio90), 3),
                         "p90_ratio_spread": [round(min(ratio90), 3), round(max(ratio90), 3)]})
    return {"rows": rows, "shadows": {f"{p:g}": v for p, v in shadows.items()},
            "rounds": args.rounds, "requests": args.requests, "machine": platform.platform(),
            "cpus": len(os.sched_getaffinity(0))}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Shadow comparisons: the stable version's time to first token",
             "", f"`python -m benchmarks.shadow_cost` ({result['rounds']} rounds, "
             f"{result['requests']} requests per share, round and load; tiny-llama, CPU vLLM, "
             f"{result['cpus']} CPUs). Ratios are to shadows off in the same round: median "
             "[min, max].", "",
             "| concurrency | shadow % | stable requests | TTFT p50 ms [spread] | p50 / off | "
             "TTFT p90 ms | p90 / off |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['concurrency']} | {r['shadow_percent']:g} | {r['stable_requests']} | "
                     f"{r['ttft_p50_ms']} [{r['ttft_p50_spread'][0]}, {r['ttft_p50_spread'][1]}] | "
                     f"{r['p50_ratio']} [{r['p50_ratio_spread'][0]}, {r['p50_ratio_spread'][1]}] | "
                     f"{r['ttft_p90_ms']} | {r['p90_ratio']} "
                     f"[{r['p90_ratio_spread'][0]}, {r['p90_ratio_spread'][1]}] |")
    lines += ["", "Comparisons per share (all rounds and loads): " + "; ".join(
        f"{p}%: " + ", ".join(f"{k} {v:g}" for k, v in sorted(c.items())) or f"{p}%: none"
        for p, c in result["shadows"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
