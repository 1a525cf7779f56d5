"""Fairness benchmark: a quiet tenant's time to first token while another tenant floods.

    python -m benchmarks.fairness [--base tiny-llama|smollm2-135m-instruct] [--rounds 2]
                                  [--modes fifo,admission,scheduler] [--out benchmarks/results]

One gateway process per scheduling mode on the chosen base (real vLLM, CPU), identical but
for how requests are scheduled:

- ``fifo``: first come, first served (``--no-fair-scheduling``);
- ``admission``: fair admission at the door only (per-tenant queues by weight, reserved
  slots) and vLLM's first-come engine queue (``--no-engine-priority``);
- ``scheduler``: the same, and each request carries its tenant's fair-share priority into
  vLLM's ``priority`` scheduling policy (the default);
- ``target``: the scheduler, with the admission limit adapted to keep the time per output
  token near ``--tpot-target-ms`` (``--admission-tpot-target-ms``, off by default).

On tiny-llama the engine runs with ``max_num_seqs`` 8; on SmolLM2 with the demo's settings
(the gateway's defaults: ``max_num_seqs`` 16, bfloat16). Each round measures, on each
gateway in turn (the order rotates between rounds, so a noisy shared machine slows all
alike):

- alone: the quiet tenant's requests, one at a time, on an idle engine;
- flood: the same while the flood tenant keeps ``--flood-factor`` x capacity requests
  outstanding (closed loop, no think time, not streamed, from a process of its own).

Both tenants call the bare base, so only the scheduling differs. TTFT is measured by the
client (streamed, first content chunk); the gateway's own TTFT histogram (admitted to
first token, in the gateway process) is reported beside it, to tell time in the engine from
time in the gateway. The flood's throughput is its completion tokens per second while the
quiet tenant was measured. Writes ``<name>.json`` and ``<name>.md`` to ``--out`` (name:
``fairness-<base>`` unless ``--name``). Goal (issue 23): the quiet tenant's p99 under the
flood within 2x of its p99 alone, on the demo's settings and on the tiny base, with the
flood's throughput loss stated.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from adapters_registry import AdapterTemplate, Registry, derive_contract
from loadtest.client import RequestRecord, RequestShape, Target, freeze_heap, send
from loadtest.servers import ServerProcess, free_port, gateway_command, start

# The gateways run without a metrics port: /metrics on the API port, with the admin key.
ADMIN_KEY = "lgw-admin-" + "f" * 32
_ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

REPO = Path(__file__).resolve().parents[1]
# Engine settings per base: tiny-llama as the fast tests run it; SmolLM2 as the demo does
# (no flag: the gateway's defaults).
ENGINES: dict[str, dict[str, Any]] = {
    "tiny-llama": {"dtype": "float32", "max_num_seqs": 8, "max_model_len": 512, "max_loras": 1,
                   "max_cpu_loras": 2},
    "smollm2-135m-instruct": {},
}
DEMO_MAX_NUM_SEQS = 16  # the gateway's default, as the demo runs it
SHAPE = RequestShape(prompt="Write one sentence about the sea.", max_tokens=32)
MODES = {"fifo": ["--no-fair-scheduling"],
         "admission": ["--fair-scheduling", "--no-engine-priority"],
         "scheduler": ["--fair-scheduling", "--engine-priority"],
         # The scheduler, with the admission limit adapted to a TPOT target (--tpot-target-ms).
         "target": ["--fair-scheduling", "--engine-priority", "--admission-tpot-target-ms"]}


def build_registry(work: Path, base_name: str) -> tuple[Any, dict[str, str]]:
    """The base and tenants ``quiet`` and ``flood`` with a key each."""
    from trainer.bases import prepare_base

    base = prepare_base(base_name, REPO / ".cache" / "models")
    contract = derive_contract(base.path, base.model_id, license=base.license)
    registry = Registry.open(f"sqlite:///{work / 'registry.db'}", work / "artifacts", actor="bench")
    try:
        registry.register_base(contract)
        registry.register_template(AdapterTemplate(contract.model_id, contract.revision, r=8,
                                                   lora_alpha=16))
        keys = {}
        for tenant in ("quiet", "flood"):
            registry.create_tenant(tenant)
            keys[tenant] = registry.create_api_key(tenant)
    finally:
        registry.close()
    return base, keys


def start_gateway(work: Path, base: Any, engine: dict[str, Any], mode: str,
                  tpot_target_ms: float) -> ServerProcess:
    port = free_port()
    args = ["--database-url", f"sqlite:///{work / 'registry.db'}", "--artifacts-dir",
            str(work / "artifacts"), "--cache-dir", str(work / f"cache-{mode}"),
            "--base-model-id", base.model_id, "--base-model-dir", str(base.path),
            *(f"--{k.replace('_', '-')}={v}" for k, v in engine.items()), *MODES[mode],
            *([str(tpot_target_ms)] if mode == "target" else []),
            # Queue the whole flood: this measures waiting, not refusals.
            "--queue-max-per-tenant", "1000", "--queue-max-total", "1000",
            "--queue-deadline-seconds", "600"]
    return start(gateway_command(port, args), work / f"gateway-{mode}.log", cwd=REPO, port=port,
                 env={"PYTHONPATH": str(REPO), "LGW_ADMIN_API_KEY": ADMIN_KEY})


async def quiet_requests(url: str, target: Target, n: int, gap_s: float) -> list[RequestRecord]:
    records = []
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(n):
            records.append(await send(client, url, target, SHAPE, RequestRecord(target.label, "quiet", i)))
            await asyncio.sleep(gap_s)
    return records


def _flood(url: str, target: Target, clients: int, stop: Any, served: Any, refused: Any,
           tokens: Any) -> None:
    """The flood tenant: ``clients`` non-streamed requests always outstanding, until ``stop``.

    Its process runs at a lower CPU priority, so that on 2 shared cores the load
    generator's own work does not delay the measuring client.
    """
    os.nice(10)
    freeze_heap()
    body = {"model": target.model, "max_tokens": SHAPE.max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": SHAPE.prompt}]}
    headers = {"Authorization": f"Bearer {target.api_key}"}

    async def loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                response = await client.post(url + "/v1/chat/completions", json=body,
                                             headers=headers)
            except httpx.HTTPError:
                continue
            ok = response.status_code == 200
            with (served if ok else refused).get_lock():
                (served if ok else refused).value += 1
            if ok:
                with tokens.get_lock():
                    tokens.value += response.json()["usage"]["completion_tokens"]

    async def main() -> None:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as c:
            loops = [asyncio.create_task(loop(c)) for _ in range(clients)]
            while not stop.is_set():
                await asyncio.sleep(0.2)
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    asyncio.run(main())


def flood_while(url: str, target: Target, clients: int, measure: Any) -> tuple[Any, dict[str, int]]:
    """Run ``measure()`` while another process floods; the flood never shares the quiet
    tenant's client event loop, so its load cannot delay the quiet tenant's measurements."""
    stop, served, refused, tokens = mp.Event(), mp.Value("i", 0), mp.Value("i", 0), mp.Value("l", 0)
    proc = mp.Process(target=_flood, args=(url, target, clients, stop, served, refused, tokens))
    proc.start()
    try:
        time.sleep(3.0)  # the queue fills first
        with served.get_lock(), tokens.get_lock():
            served_before, tokens_before = served.value, tokens.value
        started = time.perf_counter()
        result = measure()
        seconds = time.perf_counter() - started
        with served.get_lock(), tokens.get_lock():
            served_during, tokens_during = served.value - served_before, tokens.value - tokens_before
    finally:
        stop.set()
        proc.join(120)
    return result, {"ok": served.value, "errors": refused.value, "seconds": seconds,
                    "ok_during": served_during, "tokens_during": tokens_during}


async def wait_idle(url: str, timeout_s: float = 120) -> None:
    """Until the gateway has nothing admitted or queued (the cancelled flood has drained)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            busy = 0.0
            for line in (await client.get(url + "/metrics", headers=_ADMIN)).text.splitlines():
                if line.startswith(("lgw_admitted_in_flight ", "lgw_queue_depth{")):
                    busy += float(line.rsplit(" ", 1)[1])
            if busy == 0:
                await asyncio.sleep(1.0)
                return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} did not drain in {timeout_s}s")


async def queue_waits(url: str, tenant: str) -> dict[float, float]:
    """The gateway's own histogram of ``tenant``'s waits for an engine slot: cumulative
    count per bucket bound (``le``), as /metrics has it now."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(url + "/metrics", headers=_ADMIN)).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("lgw_queue_wait_seconds_bucket{") and f'tenant="{tenant}"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            counts[float(le)] = float(line.rsplit(" ", 1)[1])
    return counts


async def gateway_ttft(url: str, tenant: str) -> tuple[float, float]:
    """The gateway's own TTFT histogram for ``tenant`` (admitted to first token, measured in
    the gateway process): (sum of seconds, count), as /metrics has it now."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(url + "/metrics", headers=_ADMIN)).text
    total = count = 0.0
    for line in text.splitlines():
        if f'tenant="{tenant}"' not in line:
            continue
        if line.startswith("lgw_time_to_first_token_seconds_sum{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("lgw_time_to_first_token_seconds_count{"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def waited_longer(before: dict[float, float], after: dict[float, float], bound: float) -> int:
    """Requests between the two scrapes that waited in admission longer than ``bound`` s."""
    total = after.get(float("inf"), 0) - before.get(float("inf"), 0)
    within = after.get(bound, 0) - before.get(bound, 0)
    return int(total - within)


def percentiles(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p99": round(float(np.percentile(ms, 99)), 1),
            "max": round(float(ms.max()), 1), "n": len(values)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="lgw-fairness-"))
    base, keys = build_registry(work, args.base)
    engine = ENGINES[args.base]
    modes = args.modes
    quiet = Target("quiet", base.model_id, keys["quiet"])
    flood = Target("flood", base.model_id, keys["flood"])
    capacity = engine.get("max_num_seqs", DEMO_MAX_NUM_SEQS)
    clients = args.flood_factor * capacity
    servers = {}
    try:
        for mode in modes:
            servers[mode] = start_gateway(work, base, engine, mode, args.tpot_target_ms)
            print(f"gateway {mode} ready in {servers[mode].startup_seconds:.0f}s", flush=True)
        ttft: dict[str, dict[str, list[float]]] = {m: {"alone": [], "flood": []} for m in modes}
        flood_stats = {m: {"ok": 0, "errors": 0, "seconds": 0.0, "ok_during": 0, "tokens_during": 0}
                       for m in modes}
        queued_long = dict.fromkeys(modes, 0)  # quiet requests under flood that waited > 0.1 s for a slot
        # The gateway's own view of the quiet tenant's TTFT under the flood: (seconds, requests).
        inside: dict[str, list[float]] = {m: [0.0, 0.0] for m in modes}
        freeze_heap()
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for mode in order:
                url = servers[mode].url
                asyncio.run(quiet_requests(url, quiet, 3, 0.1))  # warm-up, not measured
                alone = asyncio.run(quiet_requests(url, quiet, args.quiet_requests, args.gap))
                measure = functools.partial(asyncio.run, quiet_requests(url, quiet, args.quiet_requests,
                                                                        args.gap))
                waits_before = asyncio.run(queue_waits(url, "quiet"))
                inside_before = asyncio.run(gateway_ttft(url, "quiet"))
                flooded, flood_counts = flood_while(url, flood, clients, measure)
                waits_after = asyncio.run(queue_waits(url, "quiet"))
                inside_after = asyncio.run(gateway_ttft(url, "quiet"))
                inside[mode][0] += inside_after[0] - inside_before[0]
                inside[mode][1] += inside_after[1] - inside_before[1]
                queued_long[mode] += waited_longer(waits_before, waits_after, 0.1)
                asyncio.run(wait_idle(url))
                for name, records in (("alone", alone), ("flood", flooded)):
                    bad = [rec for rec in records if not rec.ok]
                    if bad:
                        raise RuntimeError(f"{mode}/{name}: {len(bad)} quiet requests failed: {bad[0].error}")
                    ttft[mode][name] += [rec.ttft for rec in records if rec.ttft is not None]
                for key, value in flood_counts.items():
                    flood_stats[mode][key] += value
                print(f"round {r} {mode}: alone {percentiles(ttft[mode]['alone'])}, "
                      f"flood {percentiles(ttft[mode]['flood'])}, flood tok/s "
                      f"{flood_counts['tokens_during'] / flood_counts['seconds']:.0f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    results: dict[str, Any] = {"modes": {}}
    for mode in modes:
        alone_ms, flood_ms = percentiles(ttft[mode]["alone"]), percentiles(ttft[mode]["flood"])
        stats = flood_stats[mode]
        results["modes"][mode] = {"alone_ttft_ms": alone_ms, "flood_ttft_ms": flood_ms,
                                  "p99_ratio": round(flood_ms["p99"] / alone_ms["p99"], 2),
                                  "flood_requests": {"ok": stats["ok"], "errors": stats["errors"]},
                                  "flood_tokens_per_s": round(stats["tokens_during"] / stats["seconds"], 1),
                                  "quiet_waited_over_100ms_in_admission": queued_long[mode],
                                  # Admitted to first token in the gateway process, vs the client's.
                                  "flood_mean_ttft_ms": {
                                      "client": round(float(np.mean(ttft[mode]["flood"])) * 1000, 1),
                                      "gateway": round(inside[mode][0] / max(1.0, inside[mode][1])
                                                       * 1000, 1)}}
    label = "demo settings (the gateway's defaults)" if not engine else "the fast tests' settings"
    results["setup"] = {
        "base": f"{args.base} ({engine.get('dtype', 'bfloat16')}, vLLM on the CPU; {label})",
        "engine": engine, "max_num_seqs": capacity, "max_tokens": SHAPE.max_tokens,
        "flood_outstanding": clients, "flood_factor": args.flood_factor, "rounds": args.rounds,
        "quiet_requests_per_phase": args.quiet_requests, "quiet_gap_s": args.gap,
        "machine": f"{platform.machine()}, {platform.python_version()}, 2 cores",
        "modes": {m: " ".join(MODES[m] + ([str(args.tpot_target_ms)] if m == "target" else []))
                  for m in modes},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                 capture_output=True, text=True).stdout.strip(),
        "command": "python -m benchmarks.fairness " + " ".join(sys.argv[1:]),
    }
    best = min(modes, key=lambda m: results["modes"][m]["p99_ratio"])
    results["setup"]["goal_met"] = {m: results["modes"][m]["p99_ratio"] <= 2.0 for m in modes}
    results["setup"]["best"] = best
    return results


def markdown_table(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        "# Fairness: a quiet tenant's TTFT while another tenant floods",
        "",
        f"{setup['base']}, max_num_seqs {setup['max_num_seqs']}, max_tokens "
        f"{setup['max_tokens']}; the flood keeps {setup['flood_outstanding']} requests outstanding "
        f"({setup['flood_factor']}x capacity); {setup['rounds']} rounds, rotating the order. "
        "Flood tok/s: the flood tenant's completion tokens per second while the quiet tenant "
        "was measured.",
        "",
        "| scheduling | quiet alone p50 / p99 (ms) | quiet under flood p50 / p99 (ms) | p99 ratio | "
        "flood tok/s | quiet requests that waited > 0.1 s for a slot | under flood, mean TTFT: "
        "client / gateway (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in results["modes"].items():
        a, f = r["alone_ttft_ms"], r["flood_ttft_ms"]
        lines.append(f"| {mode} (`{setup['modes'][mode]}`) | {a['p50']} / {a['p99']} | "
                     f"{f['p50']} / {f['p99']} | {r['p99_ratio']}x | {r['flood_tokens_per_s']} | "
                     f"{r['quiet_waited_over_100ms_in_admission']} of {f['n']} | "
                     f"{r['flood_mean_ttft_ms']['client']} / {r['flood_mean_ttft_ms']['gateway']} |")
    met = [m for m, ok in setup["goal_met"].items() if ok]
    lines += ["", f"Goal (p99 under flood within 2x of alone): met by {', '.join(met) or 'none'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quiet-requests", type=int, default=30)
    p.add_argument("--gap", type=float, default=0.2, help="seconds between the quiet tenant's requests")
    p.add_argument("--flood-factor", type=int, default=4, help="flood outstanding / engine capacity")
    p.add_argument("--base", choices=sorted(ENGINES), default="tiny-llama")
    p.add_argument("--tpot-target-ms", type=float, default=50.0, help="the target mode's TPOT target")
    p.add_argument("--modes", type=lambda v: v.split(","), default=list(MODES),
                   help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--name", default=None, help="result file stem (default: fairness-<base>)")
    args = p.parse_args(argv)
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"fairness-{args.base}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
