"""Benchmarks of serving many adapters, each printed as a ratio measured in one run.

    python -m benchmarks.serving [--out benchmarks/results] [--adapters 1000]

On the tiny-llama base (fp32, CPU), with real vLLM and the registry's artifacts on a
real S3-protocol server (moto, on loopback):

1. overhead: the gateway vs vLLM's own OpenAI server ("the engine called directly"),
   same adapter, same engine settings, same closed-loop load: throughput ratio.
2. multi-adapter: 64 (and 8) distinct adapters, all in engine memory, vs 1, through
   the gateway.
3. swap penalties: TTFT of the first request on an adapter minus hot repeats, by the
   tier it came from: engine memory (warm), local disk (cold-disk), S3 (cold-remote).
4. RSS of the gateway and its engine process before and after churning through
   ``--adapters`` more distinct adapters (engine memory holds ``max_cpu_loras``).

Throughput ratios come from alternating rounds (see benchmarks.summary.paired_ratio), so
a noisy shared machine slows both sides of a ratio alike. Adapters are one really
trained tiny adapter plus seeded perturbations of its tensors: the same shapes (so the
same compute), each a distinct artifact the registry checks. Writes bench.json,
REPORT.md and the load-test plots to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import load_file, save_file

from adapters_registry import AdapterTemplate, Registry, derive_contract
from benchmarks.summary import TARGETS, markdown, merge, paired_ratio
from loadtest.client import RequestRecord, RequestShape, Target, send
from loadtest.report import summarize, write_report
from loadtest.runner import PhaseResult, RunSpec, Scenario, run_phase
from loadtest.servers import (
    ServerProcess,
    free_port,
    gateway_command,
    start,
    vllm_server_command,
)

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-" + "x" * 32
TENANT = "bench"
ENGINE = {"max_loras": 8, "max_cpu_loras": 72, "max_num_seqs": 16, "max_model_len": 512,
          "max_lora_rank": 8}
MAX_TOKENS = 32
LONG_ANSWER = ("The sea is wide and deep, and the ships that sail on it carry the sailors home "
               "through wind and rain, past the harbour lights and the old stone pier where the "
               "gulls wait for the boats to come in at dawn.")
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "lgw-bench"


def start_s3(work: Path) -> ServerProcess:
    """moto's S3 server on loopback, with the bench's bucket."""
    import boto3

    port = free_port()
    server = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                   work / "s3.log", port=port, ready_path="/moto-api/")
    for name, value in S3_ENV.items():  # boto3's own chain, as on an operator's machine
        os.environ.setdefault(name, value)
    boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket=BUCKET)
    return server


def build_adapters(work: Path, n: int, s3_url: str, database_url: str | None = None,
                   ) -> tuple[Registry, str, Any, list[str]]:
    """The tiny base, a registry (SQLite in ``work`` unless ``database_url`` is given, artifacts
    on S3) holding ``n`` distinct adapters, the tenant's key."""
    from trainer.bases import prepare_base
    from trainer.config import RunConfig
    from trainer.data import load_chat_jsonl
    from trainer.train import train_adapter

    base = prepare_base("tiny-llama", REPO / ".cache" / "models")
    contract = derive_contract(base.path, base.model_id, license=base.license)
    template = AdapterTemplate(contract.model_id, contract.revision, r=8, lora_alpha=16)
    registry = Registry.open(database_url or f"sqlite:///{work / 'registry.db'}", f"s3://{BUCKET}/artifacts",
                             actor="bench", s3_endpoint_url=s3_url)
    registry.register_base(contract)
    registry.register_template(template)
    registry.create_tenant(TENANT)
    key = registry.create_api_key(TENANT)

    data = work / "data.jsonl"
    # An answer longer than the requests' max_tokens: every request decodes the same
    # number of tokens, so throughput compares like with like.
    data.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": LONG_ANSWER}]})
        for q in ("Write one sentence about the sea.", "Say something.", "Hello", "Who are you?")) + "\n")
    seed_dir = work / "seed-adapter"
    train_adapter(base.path, base.model_id, template, load_chat_jsonl(data),
                  RunConfig(learning_rate=1e-2, max_steps=120, batch_size=4, validation_fraction=0.0),
                  seed_dir)
    tensors = load_file(str(seed_dir / "adapter_model.safetensors"))
    names = []
    started = time.perf_counter()
    for i in range(n):
        folder = work / "variants" / f"a{i:04d}"
        shutil.copytree(seed_dir, folder)
        rng = np.random.default_rng(i)
        noisy = {k: (v + rng.normal(0, float(v.std()) * 0.05 + 1e-6, v.shape)).astype(v.dtype)
                 for k, v in tensors.items()}
        save_file(noisy, str(folder / "adapter_model.safetensors"))
        registry.push(TENANT, f"a{i:04d}", folder)
        shutil.rmtree(folder)
        names.append(f"a{i:04d}")
    print(f"registered {n} adapters in {time.perf_counter() - started:.1f}s", flush=True)
    return registry, key, base, names



def engine_flags() -> list[str]:
    return ["--dtype", "float32", *(f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items())]


def start_gateway(work: Path, base: Any, s3_url: str, tree: Path = REPO,
                  extra: Sequence[str] = (), database_url: str | None = None) -> ServerProcess:
    """The gateway, run from ``tree`` (another checkout measures an older gateway the same way);
    its registry is ``work``'s SQLite file unless ``database_url`` is given."""
    port = free_port()
    return start(gateway_command(port, [*gateway_args(work, base, s3_url, database_url), *extra]),
                 work / "gateway.log", cwd=tree, port=port, env=gateway_env(tree))


def gateway_args(work: Path, base: Any, s3_url: str, database_url: str | None = None) -> list[str]:
    """`lora-gateway serve`'s flags for the bench: ``work``'s registry, the bench's S3 bucket,
    the engine settings vLLM's server gets too."""
    return ["--database-url", database_url or f"sqlite:///{work / 'registry.db'}", "--artifacts-dir",
            f"s3://{BUCKET}/artifacts", "--s3-endpoint-url", s3_url, "--cache-dir",
            str(work / "gateway-cache"), "--base-model-id", base.model_id, "--base-model-dir",
            str(base.path), *engine_flags()]


def gateway_env(tree: Path) -> dict[str, str]:
    return {"LGW_ADMIN_API_KEY": ADMIN_KEY, "LGW_DISK_CACHE_MAX_BYTES": str(4 << 30),
            "PYTHONPATH": str(tree), **S3_ENV}


def start_vllm(work: Path, base: Any, registry: Registry, names: list[str]) -> ServerProcess:
    """vLLM's own OpenAI server with ``names`` as static LoRA modules (same engine settings)."""
    port = free_port()
    return start(vllm_server_command(port, vllm_args(work, base, registry, names)),
                 work / "vllm.log", cwd=REPO, port=port)


def vllm_args(work: Path, base: Any, registry: Registry, names: list[str]) -> list[str]:
    """vLLM's server flags: ``names`` fetched from the registry as static LoRA modules."""
    modules = []
    for name in names:
        local = work / "direct" / name
        if not local.exists():
            registry.fetch(registry.resolve(registry.get_tenant(TENANT), name), local)
        modules.append(f"{name}={local}")
    return ["--model", str(base.path), "--served-model-name", "base", "--enable-lora",
            "--lora-modules", *modules, *engine_flags()]


def phase(url: str, targets: list[Target], scenario: Scenario, name: str, **kw: Any) -> PhaseResult:
    spec = RunSpec(url=url, targets=targets, scenario=scenario,
                   shape=RequestShape(max_tokens=MAX_TOKENS), admin_key=ADMIN_KEY, **kw)
    result = asyncio.run(run_phase(spec, name))
    s = summarize(result)
    print(f"  {name}: {s['ok']}/{s['requests']} ok, {s['requests_per_second']} req/s, "
          f"{s['output_tokens_per_second']} tok/s, ttft p50 {s['ttft_ms']['p50']} ms", flush=True)
    if s["errors"]:
        raise RuntimeError(f"phase {name} had errors: {s['top_errors']}")
    return result


def throughput_rounds(args: argparse.Namespace, plan: list[tuple[str, str, list[Target], Scenario]],
                      ) -> list[dict[str, PhaseResult]]:
    """Every plan entry once per round; odd rounds run the plan backwards."""
    rounds = []
    for r in range(args.rounds):
        order = plan if r % 2 == 0 else plan[::-1]
        rounds.append({name: phase(url, t, scenario, f"{name}#{r}", concurrency=args.concurrency,
                                   max_requests=args.requests, duration=600)
                       for name, url, t, scenario in order})
    return rounds


def ttft_pairs(first: str, second: str, target: Target, pairs: int) -> dict[str, Any]:
    """One request at a time, alternating servers request by request: added latency in ms.

    The finest alternation there is: a slow spell of a shared machine lands on both sides
    of a pair alike, so the per-pair differences isolate what one server adds per request.
    """
    shape = RequestShape(max_tokens=8)

    async def go() -> tuple[list[float], list[float]]:
        a: list[float] = []
        b: list[float] = []
        async with httpx.AsyncClient(timeout=120) as client:
            for i in range(pairs):
                order = ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a))
                for url, into in order:
                    rec = await send(client, url, target, shape, RequestRecord(target.label, "pair", 0.0))
                    if not rec.ok or rec.ttft is None:
                        raise RuntimeError(f"pair request to {url} failed: {rec.status} {rec.error}")
                    into.append(rec.ttft * 1000)
        return a, b

    a, b = asyncio.run(go())
    diffs = sorted(y - x for x, y in zip(a, b, strict=True))
    q = statistics.quantiles(diffs, n=4)
    return {"pairs": pairs, "first_ttft_p50_ms": round(statistics.median(a), 2),
            "second_ttft_p50_ms": round(statistics.median(b), 2),
            "ratio_of_medians": round(statistics.median(b) / statistics.median(a), 3),
            "added_ms_median": round(statistics.median(diffs), 2),
            "added_ms_iqr": [round(q[0], 2), round(q[2], 2)]}


def churn(url: str, targets: list[Target]) -> PhaseResult:
    """Every adapter exactly once, two requests in flight (most come from S3: remote_fetch)."""
    shape = RequestShape(max_tokens=8)

    async def go() -> list[RequestRecord]:
        queue, records = list(targets), list[RequestRecord]()
        async with httpx.AsyncClient(timeout=300) as client:
            async def worker() -> None:
                while queue:
                    t = queue.pop()
                    record = RequestRecord(t.label, "churn", time.perf_counter() - started,
                                           first_on_adapter=True)
                    records.append(await send(client, url, t, shape, record))

            await asyncio.gather(worker(), worker())
        return records

    started = time.perf_counter()
    records = asyncio.run(go())
    result = PhaseResult("churn", "churn", len(targets), time.perf_counter() - started, records)
    print(f"  churn: {sum(r.ok for r in records)}/{len(targets)} ok in {result.wall_seconds:.0f}s; "
          f"median e2e {statistics.median([r.e2e for r in records if r.e2e] or [0]) * 1000:.0f} ms",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--adapters", type=int, default=1000, help="distinct adapters to churn through")
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10, help="alternating throughput rounds")
    parser.add_argument("--pairs", type=int, default=200, help="alternating single-request TTFT pairs")
    parser.add_argument("--gateway-tree", type=Path, default=REPO,
                        help="run the gateway from this checkout (to measure another version)")
    parser.add_argument("--suite", choices=("full", "overhead"), default="full",
                        help="overhead: only the throughput rounds against vLLM's own server")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()  # the servers run in other folders
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    s3 = start_s3(args.work)
    servers = [s3]
    try:
        return run(args, servers)
    finally:
        for server in reversed(servers):
            server.stop()


def run(args: argparse.Namespace, servers: list[ServerProcess]) -> int:
    s3_url = servers[0].url
    # 112 for the throughput phases and probes, then --adapters never seen before
    count = 64 if args.suite == "overhead" else 112 + args.adapters
    registry, key, base, names = build_adapters(args.work, count, s3_url)
    targets = [Target(TENANT, n, key) for n in names]
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "engine": ENGINE, "targets": TARGETS,
        "config": {"rounds": args.rounds, "requests": args.requests, "concurrency": args.concurrency,
                   "max_tokens": MAX_TOKENS, "adapters": args.adapters, "suite": args.suite}}

    # Both servers run side by side (only one is under load at a time).
    print("== starting vLLM's own OpenAI server (direct, 64 static adapters) and the gateway",
          flush=True)
    direct = start_vllm(args.work, base, registry, names[:64])
    servers.append(direct)
    gw = start_gateway(args.work, base, s3_url, args.gateway_tree)
    servers.append(gw)
    results["startup_s"] = {"direct": round(direct.startup_seconds, 1),
                            "gateway": round(gw.startup_seconds, 1)}
    direct_targets = targets[:64]  # the same names, served as vLLM's static LoRA modules
    for url, t in ((direct.url, direct_targets[:1]), (gw.url, targets[:1])):
        phase(url, t, "hot", "warm-up", concurrency=2, max_requests=16)
    phase(gw.url, targets[:64], "warm", "prefetch-64", concurrency=1, max_requests=64, duration=600)
    phase(direct.url, direct_targets, "uniform", "warm-up-64-direct", concurrency=4, max_requests=64)

    print("== TTFT one request at a time, alternating servers request by request", flush=True)
    results["ttft_pairs"] = ttft_pairs(direct.url, gw.url, targets[0], args.pairs)
    print(f"  {results['ttft_pairs']}", flush=True)

    print(f"== throughput: {args.rounds} alternating rounds", flush=True)
    plan: list[tuple[str, str, list[Target], Scenario]] = [
        ("hot-1-direct", direct.url, direct_targets[:1], "hot"),
        ("hot-1", gw.url, targets[:1], "hot"),
        ("uniform-64-direct", direct.url, direct_targets, "uniform"),
        ("uniform-64", gw.url, targets[:64], "uniform"),
        ("uniform-8", gw.url, targets[:8], "uniform")]
    rounds = throughput_rounds(args, plan)
    direct.stop()
    results["ratios"] = {
        "gateway_vs_direct": paired_ratio(rounds, "hot-1", "hot-1-direct"),
        "ttft_gateway_vs_direct": paired_ratio(rounds, "hot-1", "hot-1-direct", "ttft_p50"),
        "gateway_vs_direct_64": paired_ratio(rounds, "uniform-64", "uniform-64-direct"),
        "ttft_gateway_vs_direct_64": paired_ratio(rounds, "uniform-64", "uniform-64-direct",
                                                  "ttft_p50"),
        "64_vs_1": paired_ratio(rounds, "uniform-64", "hot-1"),
        "64_vs_1_direct": paired_ratio(rounds, "uniform-64-direct", "hot-1-direct"),
        "8_vs_1": paired_ratio(rounds, "uniform-8", "hot-1")}
    merged = {name: merge(name, [r[name] for r in rounds], len(t)) for name, _url, t, _s in plan}
    if args.suite == "overhead":
        return finish(args, results, list(merged.values()), registry, ok=True)

    print("== swap penalties, one request at a time", flush=True)
    probes = {
        "cold-remote": phase(gw.url, targets[64:80], "cold-remote", "cold-remote", max_requests=48,
                             cold_repeats=2),
        "cold-disk": phase(gw.url, targets[80:96], "cold-disk", "cold-disk", max_requests=48,
                           cold_repeats=2),
        "warm-swap": phase(gw.url, targets[96:112], "warm-swap", "warm-swap", max_requests=64,
                           cold_repeats=3),
    }
    penalties = {name: summarize(p)["swap_penalty"] for name, p in probes.items()}
    results["swap_penalty_ms"] = {
        "cold_remote": penalties["cold-remote"].get("remote_fetch", {}).get("penalty_ms"),
        "cold_disk": penalties["cold-disk"].get("disk_hit", {}).get("penalty_ms"),
        "warm_engine": penalties["warm-swap"].get("engine_hit", {}).get("penalty_ms"),
        "detail": penalties,
    }

    print(f"== RSS, then churn through {args.adapters} more distinct adapters", flush=True)
    rss_before = gw.rss_by_process()
    churned = churn(gw.url, targets[112:])
    rss_after = gw.rss_by_process()
    before, after = sum(rss_before.values()), sum(rss_after.values())
    s_churn = summarize(churned)
    results["rss"] = {"before_bytes": before, "after_bytes": after, "growth": round(after / before - 1, 4),
                      "before_by_process": rss_before, "after_by_process": rss_after,
                      "adapters_churned": len({r.target for r in churned.records}),
                      "churn_errors": s_churn["errors"], "churn_tiers": s_churn["tiers"]}
    return finish(args, results, [*merged.values(), *probes.values(), churned], registry,
                  ok=not s_churn["errors"])


def finish(args: argparse.Namespace, results: dict[str, Any], phases: list[PhaseResult],
           registry: Registry, *, ok: bool) -> int:
    results["phases"] = {p.name: summarize(p) for p in phases}
    registry.close()
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, {"benchmark": "benchmarks.serving", **results["config"]}, phases,
                 throughput_phases=["hot-1", "uniform-8", "uniform-64"])
    (args.out / "loadtest.json").replace(args.out / "phases.json")
    (args.out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "REPORT.md").write_text(markdown(results))
    shown = ("ratios", "swap_penalty_ms", "rss")
    print(json.dumps({k: results[k] for k in shown if k in results}, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
