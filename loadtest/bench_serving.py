"""Benchmarks of serving many adapters, each printed as a ratio measured in one run.

    python -m loadtest.bench_serving [--out loadtest/results] [--adapters 1000]

On the tiny-llama base (fp32, CPU), with real vLLM:

1. overhead: gateway vs vLLM's own OpenAI server ("the engine called directly"), same
   adapter, same engine settings, same closed-loop load: throughput ratio.
2. multi-adapter: 64 distinct adapters (uniform, all resident) vs 1, through the gateway.
3. swap penalties: TTFT of a first request on an adapter minus a repeated one, per tier
   (cold-remote, cold-disk, warm = engine memory, hot = batch slot).
4. RSS of the gateway and its engine process before and after churning through
   ``--adapters`` distinct adapters (engine memory holds ``max_cpu_loras`` of them).

Adapters are one really trained tiny adapter plus seeded perturbations of its tensors:
the same shapes (so the same compute), each a distinct artifact the registry checks.
Writes bench.json, REPORT.md and the load-test plots to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from adapters_registry import AdapterTemplate, Registry, derive_contract
from loadtest.client import RequestShape, Target
from loadtest.report import summarize, write_report
from loadtest.runner import PhaseResult, RunSpec, run_phase
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
TARGETS = {"gateway_vs_direct": 0.98, "64_vs_1": 0.90, "warm_penalty_ms": 10.0, "rss_growth": 0.05}


def build_adapters(work: Path, n: int) -> tuple[Registry, str, Any, list[str]]:
    """The tiny base, a registry holding ``n`` distinct adapters, and the tenant's key."""
    from trainer.bases import prepare_base
    from trainer.config import RunConfig
    from trainer.data import load_chat_jsonl
    from trainer.train import train_adapter

    base = prepare_base("tiny-llama", REPO / ".cache" / "models")
    contract = derive_contract(base.path, base.model_id, license=base.license)
    template = AdapterTemplate(contract.model_id, contract.revision, r=8, lora_alpha=16)
    registry = Registry.open(f"sqlite:///{work / 'registry.db'}", work / "artifacts", actor="bench")
    registry.register_base(contract)
    registry.register_template(template)
    registry.create_tenant(TENANT)
    key = registry.create_api_key(TENANT)

    data = work / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": "The sea is wide and deep."}]})
        for q in ("Write one sentence about the sea.", "Say something.", "Hello", "Who are you?")) + "\n")
    seed_dir = work / "seed-adapter"
    train_adapter(base.path, base.model_id, template, load_chat_jsonl(data),
                  RunConfig(learning_rate=1e-2, max_steps=60, batch_size=4), seed_dir)
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


def start_gateway(work: Path, base: Any) -> ServerProcess:
    port = free_port()
    args = ["--database-url", f"sqlite:///{work / 'registry.db'}", "--artifacts-dir",
            str(work / "artifacts"), "--cache-dir", str(work / "gateway-cache"),
            "--base-model-id", base.model_id, "--base-model-dir", str(base.path), *engine_flags()]
    return start(gateway_command(port, args), work / "gateway.log", cwd=REPO, port=port,
                 env={"LGW_ADMIN_API_KEY": ADMIN_KEY, "LGW_DISK_CACHE_MAX_BYTES": str(4 << 30)})


def start_vllm(work: Path, base: Any, registry: Registry, name: str) -> ServerProcess:
    version = registry.resolve(registry.get_tenant(TENANT), name)
    local = work / "direct" / name
    if not local.exists():
        registry.fetch(version, local)
    port = free_port()
    args = ["--model", str(base.path), "--served-model-name", "base", "--enable-lora",
            "--lora-modules", f"{name}={local}", *engine_flags()]
    return start(vllm_server_command(port, args), work / "vllm.log", cwd=REPO, port=port)


def phase(url: str, targets: list[Target], scenario: str, name: str, **kw: Any) -> PhaseResult:
    spec = RunSpec(url=url, targets=targets, scenario=scenario,  # type: ignore[arg-type]
                   shape=RequestShape(max_tokens=32), admin_key=ADMIN_KEY, **kw)
    result = asyncio.run(run_phase(spec, name))
    s = summarize(result)
    print(f"  {name}: {s['ok']}/{s['requests']} ok, {s['requests_per_second']} req/s, "
          f"{s['output_tokens_per_second']} tok/s, ttft p50 {s['ttft_ms']['p50']} ms", flush=True)
    return result


def hot_throughput(url: str, targets: list[Target], args: argparse.Namespace, name: str) -> PhaseResult:
    phase(url, targets[:1], "hot", "warm-up", mode="closed", concurrency=2, max_requests=8)
    return phase(url, targets[:1], "hot", name, mode="closed", concurrency=args.concurrency,
                 max_requests=args.requests, duration=600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "loadtest" / "results")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=160, help="requests per throughput phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    registry, key, base, names = build_adapters(args.work, max(args.adapters, 64 + 48))
    targets = [Target(TENANT, n, key) for n in names]
    results: dict[str, Any] = {"machine": {"cpus": 2, "python": platform.python_version(),
                                           "platform": platform.platform()},
                               "engine": ENGINE, "targets": TARGETS}
    phases: list[PhaseResult] = []

    # Both servers run side by side (only one is ever under load) and throughput phases
    # alternate in rounds, so drift on a shared machine hits every side alike.
    print("== starting vLLM's own OpenAI server (direct) and the gateway", flush=True)
    direct = start_vllm(args.work, base, registry, names[0])
    gw = start_gateway(args.work, base)
    results["startup_s"] = {"direct": round(direct.startup_seconds, 1),
                            "gateway": round(gw.startup_seconds, 1)}
    try:
        d_target = [replace(targets[0], model=names[0])]
        for url, t in ((direct.url, d_target), (gw.url, targets[:1])):
            phase(url, t, "hot", "warm-up", concurrency=2, max_requests=16)
        phase(gw.url, targets[:64], "warm", "prefetch-64", concurrency=1, max_requests=64, duration=600)
        rounds: dict[str, list[PhaseResult]] = {"hot-1-direct": [], "hot-1": [], "uniform-8": [],
                                                "uniform-64": []}
        plan = [("hot-1-direct", direct.url, d_target, "hot"), ("hot-1", gw.url, targets[:1], "hot"),
                ("uniform-8", gw.url, targets[:8], "warm"),
                ("uniform-64", gw.url, targets[:64], "warm")]
        for r in range(args.rounds):
            for name, url, t, scenario in plan:
                rounds[name].append(phase(url, t, scenario, f"{name}#{r}", concurrency=args.concurrency,
                                          max_requests=args.requests, duration=600))
        direct.stop()
        merged = {name: merge(name, rs) for name, rs in rounds.items()}
        results["rounds"] = {name: [summarize(p)["output_tokens_per_second"] for p in rs]
                             for name, rs in rounds.items()}
        # Swap penalties, one request at a time, each on its own fresh set of adapters.
        remote = phase(gw.url, targets[64:80], "cold-remote", "cold-remote", max_requests=48,
                       cold_repeats=2)
        disk = phase(gw.url, targets[80:96], "cold-disk", "cold-disk", max_requests=48, cold_repeats=2)
        warm = phase(gw.url, targets[96:112], "warm", "warm-sequential", concurrency=1,
                     max_requests=96, duration=600)
        phases += [*merged.values(), remote, disk, warm]

        print(f"== churn through {args.adapters} distinct adapters", flush=True)
        phase(gw.url, targets[:100], "zipf", "churn-warm-up", concurrency=2,
              max_requests=200, zipf_s=0.0, duration=600)
        rss_before = gw.rss_bytes()
        churn = _churn(gw.url, targets[: args.adapters])
        rss_after = gw.rss_bytes()
    finally:
        direct.stop()
        rc = gw.stop()
    if rc not in (0, -15):
        print(gw.log_tail())

    s = {p.name: summarize(p) for p in [*phases, churn]}
    pen = {**s["cold-remote"]["swap_penalty"], **s["cold-disk"]["swap_penalty"]}
    warm_pen = s["warm-sequential"]["swap_penalty"]
    results["ratios"] = {
        "gateway_vs_direct": _ratio(s["hot-1"], s["hot-1-direct"]),
        "64_vs_1": _ratio(s["uniform-64"], s["hot-1"]),
        "8_vs_1": _ratio(s["uniform-8"], s["hot-1"]),
    }
    results["swap_penalty_ms"] = {
        "cold_remote": pen.get("remote_fetch", {}).get("penalty_ms"),
        "cold_disk": pen.get("disk_hit", {}).get("penalty_ms"),
        "warm_engine": warm_pen.get("engine_hit", {}).get("penalty_ms"),
        "hot_slot": warm_pen.get("slot_hit", {}).get("penalty_ms"),
        "detail": {"cold-remote": s["cold-remote"]["swap_penalty"],
                   "cold-disk": s["cold-disk"]["swap_penalty"], "warm": warm_pen},
    }
    results["rss"] = {"before_bytes": rss_before, "after_bytes": rss_after,
                      "growth": round(rss_after / rss_before - 1, 4),
                      "adapters_churned": len({r.target for r in churn.records}),
                      "churn_errors": s["churn"]["errors"]}
    results["phases"] = s
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, {"benchmark": "bench_serving", **vars(args)} | {"out": str(args.out),
                 "work": str(args.work)}, phases,
                 throughput_phases=["hot-1", "uniform-8", "uniform-64"])
    (args.out / "loadtest.json").rename(args.out / "phases.json")
    (args.out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "REPORT.md").write_text(markdown(results))
    print(json.dumps({k: results[k] for k in ("ratios", "swap_penalty_ms", "rss")}, indent=2,
                     default=str))
    registry.close()
    return 0


def markdown(r: dict[str, Any]) -> str:
    """The committed summary: each figure next to its target, met or missed."""
    ratios, pen, rss = r["ratios"], r["swap_penalty_ms"], r["rss"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = [
        ("gateway / vLLM server, same adapter (tok/s)", f"{ratios['gateway_vs_direct']['tok_s']:.3f}",
         ">= 0.98", verdict(ratios["gateway_vs_direct"]["tok_s"] >= TARGETS["gateway_vs_direct"])),
        ("64 distinct adapters / 1 adapter (tok/s)", f"{ratios['64_vs_1']['tok_s']:.3f}", ">= 0.90",
         verdict(ratios["64_vs_1"]["tok_s"] >= TARGETS["64_vs_1"])),
        ("8 distinct adapters / 1 adapter (tok/s)", f"{ratios['8_vs_1']['tok_s']:.3f}", "-", "-"),
        ("warm swap penalty (engine memory), ms", f"{pen['warm_engine']}", "<= 10",
         verdict(pen["warm_engine"] is not None and pen["warm_engine"] <= TARGETS["warm_penalty_ms"])),
        ("hot swap penalty (batch slot), ms", f"{pen['hot_slot']}", "-", "-"),
        ("cold-disk swap penalty, ms", f"{pen['cold_disk']}", "-", "-"),
        ("cold-remote swap penalty, ms", f"{pen['cold_remote']}", "-", "-"),
        (f"RSS growth after {rss['adapters_churned']} distinct adapters",
         f"{rss['growth'] * 100:.2f}% ({rss['before_bytes'] / 2**20:.0f} -> "
         f"{rss['after_bytes'] / 2**20:.0f} MiB)", "<= 5%", verdict(rss["growth"] <= TARGETS["rss_growth"])),
    ]
    lines = ["| benchmark | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    per_round = "\n".join(f"- {k}: {', '.join(f'{v:.0f}' for v in vs)} tok/s"
                          for k, vs in r["rounds"].items())
    return (f"# Serving benchmarks (generated by `python -m loadtest.bench_serving`)\n\n"
            f"Machine: {r['machine']['cpus']} CPU cores, {r['machine']['platform']}. "
            f"Engine settings: `{json.dumps(r['engine'])}` (tiny-llama, fp32, vLLM CPU).\n\n"
            + "\n".join(lines) + "\n\nThroughput per alternating round:\n\n" + per_round
            + "\n\nPlots: `ttft_cdf_by_tier.png`, `throughput_vs_adapters.png`; "
            "raw figures: `bench.json`, per-request records: `phases.json`.\n")


def merge(name: str, parts: list[PhaseResult]) -> PhaseResult:
    """Rounds of one kind as one phase: all records, summed load time."""
    return PhaseResult(name, parts[0].scenario, max(p.distinct_adapters for p in parts),
                       sum(p.wall_seconds for p in parts), [r for p in parts for r in p.records])


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {"tok_s": round(a["output_tokens_per_second"] / b["output_tokens_per_second"], 3),
            "req_s": round(a["requests_per_second"] / b["requests_per_second"], 3),
            "numerator_tok_s": a["output_tokens_per_second"],
            "denominator_tok_s": b["output_tokens_per_second"]}


def _churn(url: str, targets: list[Target]) -> PhaseResult:
    """Every adapter exactly once, two at a time (most come from the store: remote_fetch)."""
    spec = RunSpec(url=url, targets=targets, scenario="tenants", shape=RequestShape(max_tokens=8),
                   admin_key=ADMIN_KEY)
    started = time.perf_counter()

    async def go() -> PhaseResult:
        import httpx

        from loadtest.runner import _one

        records = []
        async with httpx.AsyncClient(timeout=300) as client:
            queue = list(targets)

            async def worker() -> None:
                while queue:
                    t = queue.pop()
                    records.append(await _one(client, spec, t, started, "churn", True))

            await asyncio.gather(worker(), worker())
        return PhaseResult("churn", "churn", len(targets), time.perf_counter() - started, records)

    result = asyncio.run(go())
    print(f"  churn: {sum(r.ok for r in result.records)}/{len(targets)} ok in "
          f"{result.wall_seconds:.0f}s; median e2e "
          f"{statistics.median([r.e2e for r in result.records if r.e2e] or [0]) * 1000:.0f} ms", flush=True)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
