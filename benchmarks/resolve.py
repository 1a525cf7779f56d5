"""Benchmark: resolving a tenant's `model` among 10,000 registered adapter versions.

    python -m benchmarks.resolve [--tenants 100] [--adapters 100] [--lookups 100000]
                                 [--in-use 64] [--steady-s 6] [--ttl 2]

Measures, in one run, the gateway's resolution path (TenantDirectory.resolve) cold
(through the registry database, SQLite by default) and from its TTL cache, and prints
percentiles as JSON. Rows are inserted directly: resolution never touches blobs.

Then steady use: ``--in-use`` names resolved over and over for ``--steady-s`` seconds with
the gateway's default TTL, as under serving load, once keeping entries fresh by the TTL
alone (a lookup per entry per half-TTL) and once with the registry's generation watch (as
the gateway runs); it reports the registry reads per second and the CPU seconds per
second they cost the process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.orm import Session

from adapters_registry import (
    AdapterInfo,
    AdapterTemplate,
    BaseContract,
    FilesystemStore,
    ModelRef,
    Registry,
    Resolution,
    Tenant,
)
from adapters_registry.database import make_engine
from adapters_registry.db import AdapterRow, AdapterVersionRow, AliasRow
from gateway.tenancy.directory import TenantDirectory
from gateway.tenancy.freshness import GenerationWatch

_CONTRACT = BaseContract(
    model_id="bench-base", revision="b" * 64, architecture="LlamaForCausalLM", hidden_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, vocab_size=2048, max_position_embeddings=2048,
    tokenizer_sha256="t" * 64, chat_template_sha256="c" * 64, dtype="float32")


def populate(registry: Registry, tenants: int, adapters: int) -> list[Tenant]:
    registry.register_base(_CONTRACT)
    template = registry.register_template(AdapterTemplate(_CONTRACT.model_id, _CONTRACT.revision))
    made = [registry.create_tenant(f"tenant-{t:04d}") for t in range(tenants)]
    with Session(registry.db) as s, s.begin():
        for tenant in made:
            ids = s.scalars(insert(AdapterRow).returning(AdapterRow.id), [
                {"tenant_id": tenant.id, "name": f"bot-{a:04d}",
                 "template_id": template.template_id, "default_alias": "prod"}
                for a in range(adapters)]).all()
            vids = s.scalars(insert(AdapterVersionRow).returning(AdapterVersionRow.id), [
                {"adapter_id": aid, "version": 1, "content_sha256": f"{aid:064x}",
                 "files": {}, "manifest": {}, "size_bytes": 0} for aid in ids]).all()
            s.execute(insert(AliasRow), [{"adapter_id": aid, "name": "prod", "version_id": vid}
                                         for aid, vid in zip(ids, vids, strict=True)])
    return made


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    us = sorted(x / 1000 for x in samples_ns)
    return {"p50_us": round(us[len(us) // 2], 2), "p99_us": round(us[int(len(us) * 0.99)], 2),
            "max_us": round(us[-1], 2), "mean_us": round(statistics.fmean(us), 2), "n": len(us)}


async def measure(directory: TenantDirectory, names: list[tuple[Tenant, str]], lookups: int,
                  cold_sample: int) -> dict[str, object]:
    rng = random.Random(0)
    cold = []
    for tenant, model in rng.sample(names, cold_sample):
        t = time.perf_counter_ns()
        await directory.resolve(tenant, directory.parse(tenant, model))
        cold.append(time.perf_counter_ns() - t)
    for tenant, model in names:  # warm every name once
        await directory.resolve(tenant, directory.parse(tenant, model))
    hot = []
    for _ in range(lookups):
        tenant, model = names[rng.randrange(len(names))]
        t = time.perf_counter_ns()
        await directory.resolve(tenant, directory.parse(tenant, model))
        hot.append(time.perf_counter_ns() - t)
    return {"cold_through_database": percentiles(cold), "cached": percentiles(hot)}


class _Counting:
    """The registry's reads the directory makes (``RegistryReads``), counted."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.reads = 0

    def resolve_split(self, tenant: Tenant, model: ModelRef) -> Resolution:
        self.reads += 1
        return self._registry.resolve_split(tenant, model)

    def authenticate_until(self, api_key: str) -> tuple[Tenant, datetime | None]:
        self.reads += 1
        return self._registry.authenticate_until(api_key)

    def get_tenant(self, name: str) -> Tenant:
        self.reads += 1
        return self._registry.get_tenant(name)

    def list_adapters(self, tenant: Tenant) -> list[AdapterInfo]:
        self.reads += 1
        return self._registry.list_adapters(tenant)

    def generation(self) -> int:
        self.reads += 1
        return self._registry.generation()


async def steady(registry: Registry, names: list[tuple[Tenant, str]], *, seconds: float,
                 ttl: float, watched: bool) -> dict[str, float]:
    counting = _Counting(registry)
    watch = GenerationWatch(counting.generation, ttl) if watched else None
    directory = TenantDirectory(counting, served_base=(_CONTRACT.model_id, _CONTRACT.revision),
                                ttl=ttl, watch=watch)
    if watch is not None:
        watch.start()
    for tenant, model in names:
        await directory.resolve(tenant, directory.parse(tenant, model))
    counting.reads = 0
    cpu, wall = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall < seconds:
        for tenant, model in names:
            await directory.resolve(tenant, directory.parse(tenant, model))
        await asyncio.sleep(0.01)  # about 100 requests per name per second
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if watch is not None:
        await watch.stop()
    return {"registry_reads_per_s": round(counting.reads / wall, 2),
            "cpu_s_per_s": round(cpu / wall, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--adapters", type=int, default=100, help="per tenant, one version each")
    p.add_argument("--lookups", type=int, default=100_000)
    p.add_argument("--db", help="SQLAlchemy URL (default: a temporary SQLite file)")
    p.add_argument("--in-use", type=int, default=64, help="names in steady use")
    p.add_argument("--steady-s", type=float, default=6.0)
    p.add_argument("--ttl", type=float, default=2.0, help="the resolve TTL (the gateway's default)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(make_engine(args.db or f"sqlite:///{Path(tmp) / 'bench.db'}"),
                            FilesystemStore(Path(tmp) / "artifacts"))
        started = time.perf_counter()
        tenants = populate(registry, args.tenants, args.adapters)
        populated_s = time.perf_counter() - started
        names = [(t, f"bot-{a:04d}") for t in tenants for a in range(args.adapters)]
        directory = TenantDirectory(registry, served_base=(_CONTRACT.model_id, _CONTRACT.revision),
                                    ttl=3600)
        result = asyncio.run(measure(directory, names, args.lookups, cold_sample=min(1000, len(names))))
        in_use = names[:: max(1, len(names) // args.in_use)][:args.in_use]
        result["steady"] = {"in_use": len(in_use), "seconds": args.steady_s, "ttl_s": args.ttl} | {
            mode: asyncio.run(steady(registry, in_use, seconds=args.steady_s, ttl=args.ttl,
                                     watched=mode == "generation_watch"))
            for mode in ("ttl_only", "generation_watch")}
        registry.close()
    print(json.dumps({"versions": len(names), "populate_s": round(populated_s, 2), **result},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
