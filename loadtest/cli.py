"""`lora-gateway loadtest`: drive any OpenAI-compatible server and report latency by tier.

    lora-gateway loadtest --url http://127.0.0.1:8000 --targets targets.yaml \\
        --admin-key "$LGW_ADMIN_API_KEY" --scenario zipf --mode open --rate 4 \\
        --duration 60 --sweep-adapters 1,4,16 --out loadtest-out

A targets file lists who calls which adapter (YAML or JSON)::

    targets:
      - {tenant: acme, model: support-bot, api_key: lgw_...}
      - {tenant: blackbeard, model: pirate, api_key: lgw_...}

For a single tenant, ``--api-key KEY --tenant NAME --model M [--model M2 ...]`` does the
same. Against a plain vLLM server, name its ``--lora-modules`` as models and use any key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from loadtest.client import RequestShape, Target
from loadtest.report import write_report
from loadtest.runner import SCENARIOS, LoadTestError, PhaseResult, RunSpec, run_phase


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("loadtest", help="measure latency, throughput and adapter swap penalties",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL (without /v1)")
    p.add_argument("--targets", type=Path, help="YAML/JSON file of {tenant, model, api_key} targets")
    p.add_argument("--api-key", help="key for --model targets (default: $LGW_LOADTEST_API_KEY)")
    p.add_argument("--tenant", default="default", help="tenant of the --model targets")
    p.add_argument("--model", action="append", default=[], help="an adapter name; repeatable")
    p.add_argument("--admin-key", help="gateway admin key, for warm/cold scenarios "
                   "(default: $LGW_ADMIN_API_KEY)")
    p.add_argument("--scenario", choices=SCENARIOS, default="hot")
    p.add_argument("--mode", choices=("closed", "open"), default="closed",
                   help="closed: fixed concurrency; open: fixed arrival rate")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rate", type=float, default=2.0, help="open loop: requests per second")
    p.add_argument("--arrival", choices=("uniform", "poisson"), default="uniform")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per phase (upper bound)")
    p.add_argument("--max-requests", type=int, default=200, help="requests per phase (upper bound)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default=RequestShape.prompt)
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold-repeats", type=int, default=1,
                   help="cold scenarios: repeated requests after each first one")
    p.add_argument("--sweep-adapters", help="comma-separated counts: one phase per count, over the "
                   "first N targets (throughput vs distinct adapters)")
    p.add_argument("--out", type=Path, default=Path("loadtest-out"), help="folder for JSON and PNGs")


def load_targets(args: argparse.Namespace) -> list[Target]:
    targets: list[Target] = []
    if args.targets is not None:
        try:
            data = yaml.safe_load(args.targets.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise LoadTestError(f"{args.targets}: cannot read targets: {exc}") from None
        items = data.get("targets") if isinstance(data, dict) else None
        if not isinstance(items, list) or not items:
            raise LoadTestError(f"{args.targets}: expected a non-empty 'targets' list")
        for i, item in enumerate(items):
            missing = [k for k in ("tenant", "model", "api_key")
                       if not isinstance(item, dict) or not isinstance(item.get(k), str)]
            if missing:
                raise LoadTestError(f"{args.targets}: target {i} lacks string field(s) {missing}")
            targets.append(Target(item["tenant"], item["model"], item["api_key"]))
    if args.model:
        key = args.api_key or os.environ.get("LGW_LOADTEST_API_KEY")
        if not key:
            raise LoadTestError("--model needs --api-key (or $LGW_LOADTEST_API_KEY)")
        targets += [Target(args.tenant, m, key) for m in args.model]
    return targets


def _sweep(text: str | None, n_targets: int) -> list[int]:
    if not text:
        return []
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise LoadTestError(f"--sweep-adapters expects integers, got {text!r}") from None
    if not counts or counts[0] < 1 or counts[-1] > n_targets:
        raise LoadTestError(f"--sweep-adapters counts must be within 1..{n_targets} (the targets given)")
    return counts


def build_specs(args: argparse.Namespace) -> list[tuple[str, RunSpec]]:
    targets = load_targets(args)
    base = RunSpec(
        url=args.url, targets=targets, scenario=args.scenario, mode=args.mode,
        concurrency=args.concurrency, rate=args.rate, arrival=args.arrival, duration=args.duration,
        max_requests=args.max_requests,
        shape=RequestShape(prompt=args.prompt, max_tokens=args.max_tokens),
        zipf_s=args.zipf_s, seed=args.seed,
        admin_key=args.admin_key or os.environ.get("LGW_ADMIN_API_KEY"),
        cold_repeats=args.cold_repeats,
    )
    counts = _sweep(args.sweep_adapters, len(targets))
    if not counts:
        base.check()
        return [(args.scenario, base)]
    specs = []
    for n in counts:
        spec = RunSpec(**{**base.__dict__, "targets": targets[:n]})
        spec.check()
        specs.append((f"{args.scenario}-{n}", spec))
    return specs


def run(args: argparse.Namespace) -> int:
    try:
        specs = build_specs(args)
        phases: list[PhaseResult] = []
        for name, spec in specs:
            print(f"== phase {name}: {spec.scenario}, {len(spec.targets)} target(s), {spec.mode} loop",
                  file=sys.stderr, flush=True)
            phases.append(asyncio.run(run_phase(spec, name)))
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = _public_config(args)
    doc = write_report(args.out, config, phases)
    for summary in doc["phases"]:
        print(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'loadtest.json'} and {', '.join(doc['plots'])}", file=sys.stderr)
    return 0 if all(s["ok"] for s in doc["phases"]) else 1


def _public_config(args: argparse.Namespace) -> dict[str, Any]:
    hidden = {"api_key", "admin_key"}  # never write secrets into the report
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in hidden and not callable(v) and k != "command"}
