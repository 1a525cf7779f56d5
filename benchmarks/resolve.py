"""Benchmark: resolving a tenant's `model` among 10,000 registered adapter versions.

    python -m benchmarks.resolve [--tenants 100] [--adapters 100] [--lookups 100000]

Measures, in one run, the gateway's resolution path (TenantDirectory.resolve) cold
(through the registry database, SQLite by default) and from its TTL cache, and prints
percentiles as JSON. Rows are inserted directly: resolution never touches blobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.orm import Session

from adapters_registry import AdapterTemplate, BaseContract, FilesystemStore, Registry
from adapters_registry.db import AdapterRow, AdapterVersionRow, AliasRow, make_engine
from adapters_registry.records import Tenant
from gateway.tenancy import TenantDirectory

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--adapters", type=int, default=100, help="per tenant, one version each")
    p.add_argument("--lookups", type=int, default=100_000)
    p.add_argument("--db", help="SQLAlchemy URL (default: a temporary SQLite file)")
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
        registry.close()
    print(json.dumps({"versions": len(names), "populate_s": round(populated_s, 2), **result},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
