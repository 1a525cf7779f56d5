"""Profile the gateway's request path under load: where its event loop spends its time.

    python -m benchmarks.profile_gateway [--seconds 30] [--adapters 1] [--concurrency 8]
                                         [--gateway-tree PATH]

On the tiny base with real vLLM, a closed loop of streamed requests (concurrency 8 by default)
runs against one gateway while py-spy samples the gateway's API process (not the
engine core), counting only the thread that holds the GIL: where the process's Python
time goes. Prints the share of those samples in each stage of the request path
(inclusive, first match wins) and writes the raw collapsed stacks for a flame graph.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks.serving import ADMIN_KEY, REPO, TENANT, build_adapters, start_gateway, start_s3
from loadtest.client import RequestShape, Target
from loadtest.runner import RunSpec, run_phase
from loadtest.servers import ServerProcess

# Stage -> substrings of frames that belong to it (first match wins, in this order).
STAGES = {
    "engine output processing (vLLM, in our process)": ("vllm/v1/engine/output_processor",
                                                         "vllm/v1/engine/async_llm",
                                                         "vllm/v1/engine/core_client",
                                                         "detokenizer"),
    "chat template + tokenize": ("apply_chat_template", "prompt_ids", "render"),
    "name resolution and keys": ("gateway/tenancy/", "authenticate", "resolve"),
    "adapter residency": ("gateway/residency/manager.py",),
    "request validation (pydantic, FastAPI)": ("fastapi/routing", "fastapi/dependencies",
                                               "pydantic"),
    "SSE framing and sending": ("_sse", "_data", "json/encoder", "starlette/responses",
                                "h11", "httptools"),
    "metrics": ("prometheus_client",),
    "logging": ("logging/__init__",),
    "worker threads (to_thread)": ("concurrent/futures/thread.py",),
}


def classify(stack: str) -> str:
    for stage, needles in STAGES.items():
        if any(n in stack for n in needles):
            return stage
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--adapters", type=int, default=1, help="distinct adapters in the load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--gateway-tree", type=Path, default=REPO)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-profile")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-profile" / "stacks.txt")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    servers: list[ServerProcess] = [start_s3(args.work)]
    try:
        registry, key, base, names = build_adapters(args.work, max(args.adapters, 1), servers[0].url)
        registry.close()
        gw = start_gateway(args.work, base, servers[0].url, args.gateway_tree)
        servers.append(gw)
        targets = [Target(TENANT, n, key) for n in names]
        spec = RunSpec(url=gw.url, targets=targets, scenario="warm" if args.adapters > 1 else "hot",
                       shape=RequestShape(max_tokens=32), admin_key=ADMIN_KEY, concurrency=args.concurrency,
                       duration=args.seconds + 10, max_requests=100_000)
        asyncio.run(run_phase(RunSpec(url=gw.url, targets=targets, scenario=spec.scenario,
                                      admin_key=ADMIN_KEY, max_requests=32)))  # warm up
        recorder = subprocess.Popen(
            [py_spy, "record", "--pid", str(gw.proc.pid), "--duration", str(args.seconds),
             "--rate", "200", "--gil", "--format", "raw", "--output", str(args.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        asyncio.run(run_phase(spec))
        recorder.wait(timeout=60)
    finally:
        for server in reversed(servers):
            server.stop()
    samples: Counter[str] = Counter()
    for line in args.out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples[classify(stack)] += int(count)
    total = sum(samples.values())
    shares = {stage: round(100 * n / total, 1) for stage, n in samples.most_common()}
    print(json.dumps({"gil_samples": total, "percent": shares}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
