"""Where one streamed request's time to first token goes, stage by stage: the gateway vs
vLLM's own OpenAI server, on the real engine (tiny-llama base, CPU vLLM).

    python -m benchmarks.first_token [--requests 40] [--warmup 5] [--gateway-tree PATH]
                                     [--out benchmarks/results/first_token]

Both servers run through ``benchmarks.stage_trace`` (timers wrapped around named
functions before the server starts; neither server's code changes), side by side, each
serving the same LoRA adapter (the gateway: from the registry on moto S3; vLLM: as a
static LoRA module) with the same engine settings (``benchmarks.serving.ENGINE``). The
client sends ``--requests`` streamed chat requests to each, one at a time on kept-alive
connections, alternating servers request by request (the order flips every round); each
round's prompt is a distinct seeded ``--prompt-tokens`` token text (no prefix-cache
hits), ``max_tokens`` 16, temperature 0, ``ignore_eos``. The first ``--warmup`` rounds
are dropped. Per stage: exclusive milliseconds from uvicorn's ``run_asgi`` (the request
reaches the app) to the ASGI send of the first content event, median and p90 per server;
stages add up to that total per request. Writes ``<out>.md`` and ``<out>.json``.

``--gateway-tree`` runs the gateway from another checkout (e.g. a ``git worktree`` of
HEAD, for "before" numbers); the benchmark and its launcher always come from this one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serving import (
    ENGINE,
    REPO,
    build_adapters,
    gateway_args,
    gateway_env,
    start_s3,
    vllm_args,
)
from benchmarks.stage_trace import STAGE_ORDER, has_content, short
from loadtest.client import freeze_heap
from loadtest.servers import ServerProcess, free_port, gateway_command, start, vllm_server_command

LAUNCHER = REPO / "benchmarks" / "stage_trace.py"
SERVERS = ("gateway", "vllm")
WORDS = ["sea", "ship", "wind", "rain", "harbour", "light", "stone", "pier", "gull", "boat", "dawn",
         "sail", "home", "deep", "wide", "old", "tide", "shore", "cloud", "storm", "north", "river",
         "bridge", "market", "bread", "lamp", "window", "garden", "road", "mountain", "winter",
         "summer", "song", "letter", "morning", "evening", "quiet", "green", "silver", "map"]


def traced(server: str, trace: Path, command: list[str], after: str) -> list[str]:
    """``command`` (a server's usual one) run through the stage_trace launcher as a script."""
    rest = command[command.index(after) + 1:]
    return [sys.executable, str(LAUNCHER), server, "--out", str(trace), "--", *rest]


def start_gateway(work: Path, base: Any, s3_url: str, tree: Path, trace: Path) -> ServerProcess:
    """As ``benchmarks.serving.start_gateway``, through the launcher."""
    port = free_port()
    command = gateway_command(port, gateway_args(work, base, s3_url))
    return start(traced("gateway", trace, command, "serve"), work / "gateway.log", cwd=tree,
                 port=port, env=gateway_env(tree))


def start_vllm(work: Path, base: Any, registry: Any, names: list[str], trace: Path) -> ServerProcess:
    """As ``benchmarks.serving.start_vllm`` (``names`` as static LoRA modules), through the launcher."""
    command = vllm_server_command(free_port(), vllm_args(work, base, registry, names))
    port = int(command[command.index("--port") + 1])
    return start(traced("vllm", trace, command, "vllm.entrypoints.openai.api_server"),
                 work / "vllm.log", cwd=REPO, port=port)


def prompts(base: Any, count: int, tokens: int) -> list[str]:
    """``count`` distinct seeded word salads of ``tokens`` tokens each (the base's tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base.path))
    out = []
    for i in range(count):
        rng = random.Random(i)
        ids: list[int] = []
        while len(ids) < tokens:
            ids = tok.encode(" ".join(rng.choice(WORDS) for _ in range(tokens)), add_special_tokens=False)
        out.append(str(tok.decode(ids[:tokens])))
    return out


async def one(client: httpx.AsyncClient, url: str, key: str, body: dict[str, Any],
              trace_id: str) -> dict[str, Any]:
    """One streamed request, read to its end; the client's time to its first content event."""
    headers = {"Authorization": f"Bearer {key}", "x-trace-id": trace_id}
    t0 = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {text[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None and has_content(line.encode()):
                first = time.perf_counter()
            usage = json.loads(line[6:]).get("usage") or usage
    if first is None:
        raise RuntimeError(f"{url}: no content event in the answer to {trace_id}")
    return {"id": trace_id, "client_ttft_ms": (first - t0) * 1000,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}


async def drive(urls: dict[str, str], key: str, texts: list[str], args: argparse.Namespace,
                ) -> dict[str, list[dict[str, Any]]]:
    """Round i: one request to each server, in alternating order; the same prompt for both."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SERVERS}
    extra = {s: {"ignore_eos": True} for s in SERVERS}
    async with httpx.AsyncClient(timeout=180) as client:
        for i, text in enumerate(texts):
            for server in SERVERS if i % 2 == 0 else SERVERS[::-1]:
                body = {"model": "a0000", "messages": [{"role": "user", "content": text}],
                        "max_tokens": args.max_tokens, "temperature": 0.0, "stream": True,
                        "stream_options": {"include_usage": True}, **extra[server]}
                try:
                    rec = await one(client, urls[server], key, body, f"{server}-{i}")
                except RuntimeError as exc:
                    if i or "ignore_eos" not in str(exc):
                        raise
                    print(f"  {server} refuses ignore_eos; sent without it", flush=True)
                    extra[server] = {}
                    body.pop("ignore_eos")
                    rec = await one(client, urls[server], key, body, f"{server}-{i}")
                out[server].append({**rec, "round": i, "ignore_eos": bool(extra[server])})
    return out


def join(records: list[dict[str, Any]], trace: Path) -> list[dict[str, Any]]:
    """Each client record with its server-side breakdown (the last lines may still be in flight)."""
    for _ in range(50):
        lines = trace.read_text().splitlines() if trace.exists() else []
        by_id = {row["id"]: row for row in map(json.loads, lines)}
        if all(r["id"] in by_id for r in records):
            return [{**r, **by_id[r["id"]]} for r in records]
        time.sleep(0.1)
    raise RuntimeError(f"{trace}: no trace for {[r['id'] for r in records if r['id'] not in by_id]}")


def pct(values: list[float]) -> dict[str, float]:
    p90 = statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]
    return {"p50": round(statistics.median(values), 3), "p90": round(p90, 3)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    stages = {s: pct([r["stages"].get(s, 0.0) for r in rows]) for s in STAGE_ORDER}
    other = sorted({t for r in rows for t in r["targets"]})
    return {"stages": stages, "server_total": pct([r["total_ms"] for r in rows]),
            "client_ttft": pct([r["client_ttft_ms"] for r in rows]),
            "outside_app": pct([r["client_ttft_ms"] - r["total_ms"] for r in rows]),
            "max_abs_sum_minus_total_ms": max(abs(sum(r["stages"].values()) - r["total_ms"]) for r in rows),
            "by_target": {t: pct([r["targets"].get(t, 0.0) for r in rows]) for t in other},
            "prompt_tokens": rows[0].get("prompt_tokens"), "requests": len(rows)}


def markdown(result: dict[str, Any]) -> str:
    s = {name: result["summary"][name] for name in SERVERS}
    cfg = result["settings"]
    lines = [
        "# Time to first token by stage: the gateway vs vLLM's own server", "",
        f"{cfg['measured']} requests per server after {cfg['warmup']} warm-up, one at a time, "
        f"alternating; prompt {s['gateway']['prompt_tokens']} tokens with the chat template "
        f"(content {cfg['prompt_tokens']}), max_tokens {cfg['max_tokens']}; commit "
        f"{result['git']['repo']['commit'][:10]}{' (dirty)' if result['git']['repo']['dirty'] else ''}, "
        f"gateway tree {result['git']['gateway_tree']['commit'][:10]}. Exclusive ms, median / p90.", "",
        "| stage | gateway p50 | gateway p90 | vLLM p50 | vLLM p90 |", "|---|---:|---:|---:|---:|"]

    def row(label: str, g: dict[str, float], v: dict[str, float]) -> str:
        return f"| {label} | {g['p50']:.2f} | {g['p90']:.2f} | {v['p50']:.2f} | {v['p90']:.2f} |"

    for stage in STAGE_ORDER:
        lines.append(row(stage, s["gateway"]["stages"][stage], s["vllm"]["stages"][stage]))
    lines += [row("**server total** (run_asgi to first content written)", s["gateway"]["server_total"],
                  s["vllm"]["server_total"]),
              row("client: time to first content event", s["gateway"]["client_ttft"],
                  s["vllm"]["client_ttft"]),
              row("client minus server total (socket, uvicorn, client)", s["gateway"]["outside_app"],
                  s["vllm"]["outside_app"]), "",
              "Stages add up to the server total per request: the largest |sum - total| was "
              f"{max(s[n]['max_abs_sum_minus_total_ms'] for n in SERVERS):.2g} ms. Medians of stages "
              "need not add up to the median total.", "",
              "By target (exclusive ms, p50; the targets of `other` are the glue they name):", "",
              "| target | gateway | vLLM |", "|---|---:|---:|"]
    targets = sorted(set(s["gateway"]["by_target"]) | set(s["vllm"]["by_target"]),
                     key=lambda t: -max(s[n]["by_target"].get(t, {"p50": 0})["p50"] for n in SERVERS))
    for t in targets:
        g, v = (f"{s[n]['by_target'][t]['p50']:.3f}" if t in s[n]["by_target"] else "-" for n in SERVERS)
        lines.append(f"| `{t}` | {g} | {v} |")
    for name in SERVERS:
        missing = result["targets"][name]["missing"]
        if missing:
            lines += ["", f"Targets missing in {name} (skipped): " + ", ".join(f"`{m}`" for m in missing)]
    return "\n".join(lines) + "\n"


def git(tree: Path) -> dict[str, Any]:
    def run(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *cmd], capture_output=True, text=True).stdout.strip()
    return {"path": str(tree), "commit": run("rev-parse", "HEAD") or "?",
            "dirty": bool(run("status", "--porcelain"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per server, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first requests per server not counted")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--gateway-tree", type=Path, default=REPO,
                        help="run the gateway from this checkout (to measure another version)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-first-token")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "first_token",
                        help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if args.requests <= args.warmup:
        parser.error("--requests must exceed --warmup")
    args.work, args.gateway_tree = args.work.resolve(), args.gateway_tree.resolve()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    servers: list[ServerProcess] = []
    try:
        servers.append(start_s3(args.work))
        registry, key, base, names = build_adapters(args.work, 1, servers[0].url)
        traces = {name: args.work / f"trace-{name}.jsonl" for name in SERVERS}
        print("== starting vLLM's own server and the gateway, both through benchmarks.stage_trace",
              flush=True)
        servers.append(start_vllm(args.work, base, registry, names, traces["vllm"]))
        urls = {"vllm": servers[-1].url}
        servers.append(start_gateway(args.work, base, servers[0].url, args.gateway_tree, traces["gateway"]))
        urls["gateway"] = servers[-1].url
        registry.close()
        found = {n: json.loads(traces[n].with_suffix(".targets.json").read_text()) for n in SERVERS}
        for n in SERVERS:
            print(f"  {n}: targets wrapped, by stage:", flush=True)
            for stage, specs in found[n]["found"].items():
                print(f"    {stage}: {', '.join(map(short, specs))}", flush=True)
            print(f"    missing (skipped): {found[n]['missing'] or 'none'}", flush=True)
        print(f"  the gateway runs from {found['gateway'].get('gateway_package')}", flush=True)
        texts = prompts(base, args.requests, args.prompt_tokens)
        freeze_heap()
        print(f"== {args.requests} rounds, one request per server each", flush=True)
        client = asyncio.run(drive(urls, key, texts, args))
    finally:
        for server in reversed(servers):
            server.stop()
    rows = {n: [r for r in join(client[n], traces[n]) if r["round"] >= args.warmup] for n in SERVERS}
    result = {
        "benchmark": "benchmarks.first_token",
        "command": shlex.join(["python", "-m", "benchmarks.first_token", *sys.argv[1:]]),
        "git": {"repo": git(REPO), "gateway_tree": git(args.gateway_tree)},
        "settings": {"requests": args.requests, "warmup": args.warmup,
                     "measured": args.requests - args.warmup, "prompt_tokens": args.prompt_tokens,
                     "max_tokens": args.max_tokens, "temperature": 0.0,
                     "ignore_eos": {n: rows[n][0]["ignore_eos"] for n in SERVERS}, "engine": ENGINE,
                     "model": "a0000 (LoRA on tiny-llama)", "gateway_tree": str(args.gateway_tree)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "targets": found,
        "summary": {n: summarize(rows[n]) for n in SERVERS},
        "requests": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
